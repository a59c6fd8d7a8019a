"""Renderers of the README's results tables, one module per family of benches
(`bench/readme_tables.py` runs them)."""
