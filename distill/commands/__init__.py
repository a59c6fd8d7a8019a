"""The library side of the one-off CLI commands (`shrink`, `attach`, `inspect`): the CLI only parses and prints."""
