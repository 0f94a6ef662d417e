"""Fixtures of the engine tests; the helpers behind them are in harness.py (a module of its own:
tests/slurm has a conftest too, and two modules named conftest cannot both be imported)."""

from harness import USER, cr, tree_cr, workload_binaries  # noqa: F401 - fixtures, registered here
from multinode import nodes  # noqa: F401 - a fixture, registered here

from testbed.cluster import ensure_user


def pytest_configure(config):
    """The job user exists before any test module (some look it up at import) is collected:
    a fresh machine has none."""
    ensure_user(USER)
