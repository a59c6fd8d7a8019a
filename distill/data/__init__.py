"""Task data: built-in datasets, local files and folders (`tables`;
reading and checking a file's cells: `frames`), text corpora (`text`) and
conversations (`dialogues`) for language models, `datasets` sources (`hub`), the tokenization
cache (`token_cache`), splits and batching."""
