"""Benchmarks that print measured figures (ratios within one run); never wall-time asserts."""
