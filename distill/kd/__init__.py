"""Knowledge distillation: logit, token-level, hidden-state, attention and cosine losses; the teacher caches."""
