"""Test-bed tooling: a real multi-node Slurm cluster on one machine (see testbed/cluster.py)."""
