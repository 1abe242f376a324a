"""gla-serve model package."""
