"""Compression: depth cuts, width slicing, importance scores (layout from `distill.arch`)."""
