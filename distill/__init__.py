"""distill: compress transformer models."""
