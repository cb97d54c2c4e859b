"""Benchmarks of fpt-monai: measurements that print figures, run from the repository root as ``python -m benchmarks``.

Not part of the installed package; see ``benchmarks/README.md``.
"""
