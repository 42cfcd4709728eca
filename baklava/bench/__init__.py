"""Benchmarks (``baklava-bench``): serving load today; quality, speed and memory in later issues."""
