"""Task data: built-in datasets, local files and folders (`tables`), text corpora for language models (`text`)."""
