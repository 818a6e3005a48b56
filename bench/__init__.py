"""Benchmarks: runtimes in process, and HTTP load against real servers (``python -m bench``)."""
