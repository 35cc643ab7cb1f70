"""Adapters for other frameworks; each module imports its framework and registers on import."""
