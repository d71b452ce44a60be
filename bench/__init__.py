"""Benchmarks that print tables (speed and quality, with ratios against a baseline in the same run)."""
