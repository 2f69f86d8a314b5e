"""Benchmark scripts (see README.md); run them as files, e.g. `.venv/bin/python benchmarks/dispatch.py`."""
