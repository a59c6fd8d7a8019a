"""Task data: built-in datasets, local files and folders (`tables`), text corpora (`text`) and
conversations (`dialogues`) for language models, `datasets` sources (`hub`), the tokenization
cache (`token_cache`), splits and batching."""
