"""Fixtures for tests that need a real Slurm cluster (testbed/cluster.py)."""

from __future__ import annotations

import os

import pytest

from testbed.cluster import Cluster, missing_binaries

SLURM_PROGRAMS = ("slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "munged")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A 2-node cluster (node1, node2) in $HPCCR_TESTBED_DIR or /tmp/hpccr-testbed.

    Brought up once per session, from a clean slate, and torn down at the end.
    """
    absent = [p for p in missing_binaries() if p in SLURM_PROGRAMS]
    if absent:
        reason = f"Slurm/munge not installed ({' '.join(absent)}); run testbed/install-deps.sh"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI installs them: never skip there
        pytest.skip(reason)
    cluster = Cluster()
    cluster.down()  # leftovers of an aborted run
    cluster.up()
    yield cluster
    cluster.down()


@pytest.fixture(scope="module")
def site(slurm_cluster):
    """The test cluster with hpccr's prolog, epilog and plugin (hpccr_site.py), per module."""
    from hpccr_site import make_site

    yield from make_site(slurm_cluster)


@pytest.fixture
def jobs(site):
    """Job ids to cancel at the end of the test, whatever happened."""
    submitted: list[int] = []
    yield submitted
    for job in submitted:
        site.cluster.client("scancel", str(job), check=False)
