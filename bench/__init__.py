"""Benchmarks and the synthetic data they run on (``make bench``); not part of the installed package."""
