"""Benchmarks of the LCLStream Flight server: `python -m bench` (see README.md)."""
