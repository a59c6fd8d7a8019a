"""Recipes: YAML loading, the typed dataclasses of every section and stage, validation, --set overrides."""
