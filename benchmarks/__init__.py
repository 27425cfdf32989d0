"""Benchmarks: one script per op plus end-to-end (installed as `celldino.benchmarks`)."""
