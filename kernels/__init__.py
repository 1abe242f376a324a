"""gla-serve kernels package."""
