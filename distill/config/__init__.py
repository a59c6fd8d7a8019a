"""Recipes: the typed dataclasses of every section and stage (`recipe`), reading, validating
and writing recipe files with --set overrides (`loading`), and the strict YAML and type
conversion under both (`schema`)."""
