"""Benchmarks: measurements that print figures (never timed unit tests)."""
