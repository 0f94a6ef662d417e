#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: real processes, real kernel calls, a real
# Slurm cluster on this machine.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
