"""Benchmarks: measured ratios, printed and committed under results/."""
