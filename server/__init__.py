"""gla-serve server package."""
