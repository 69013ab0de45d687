"""Integrations of steelattn into model libraries (transformers)."""
