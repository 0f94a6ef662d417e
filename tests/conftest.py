"""Fixtures of the engine tests; the helpers behind them are in harness.py (a module of its own:
tests/slurm has a conftest too, and two modules named conftest cannot both be imported)."""

from harness import cr, tree_cr, workload_binaries  # noqa: F401 - fixtures, registered here
