"""Compression: architecture facts, depth cuts, width slicing, importance scores."""
