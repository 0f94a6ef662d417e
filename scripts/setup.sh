#!/usr/bin/env bash
# Set up everything hpccr needs on a fresh Debian 12 machine; safe to run again (fast when done).
# Installs Debian packages (compiler, Python venv/headers, Slurm and munge for the test cluster),
# then hpccr itself into ./.venv with its native parts built.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "setup: run as root (or install sudo)" >&2; exit 1; }
    SUDO="sudo"
fi

# MPICH and Open MPI: MPI jobs in the tests (tests/test_mpi.py).
packages=(gcc libc6-dev make python3 python3-venv python3-dev procps util-linux iproute2
          mpich libmpich-dev openmpi-bin libopenmpi-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi
if [ -f testbed/install-deps.sh ]; then
    $SUDO bash testbed/install-deps.sh
fi

# Debian's own Python when there is one: an interpreter under /root (pyenv and the like) cannot
# be run by the ordinary users whose Slurm jobs call hpccr.
python=/usr/bin/python3
[ -x "$python" ] || python=python3
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# hpccr's bytecode, written once: the users whose Slurm jobs run hpccr may not write it into this
# tree, nor may anyone whose environment says PYTHONDONTWRITEBYTECODE, and compiling the modules
# again in every command costs a dump or restore about 50 ms.
.venv/bin/python -m compileall -q hpccr

# mpi4py, built from source against each system MPI (one build links one MPI): .mpi4py/<mpi>,
# which the MPI tests and bench/mpi.py put first on sys.path.  2-6 minutes each, once.
for mpi in mpich openmpi; do
    target=.mpi4py/$mpi
    if [ ! -f "$target/.built" ]; then
        echo "setup: building mpi4py against $mpi (a few minutes)"
        rm -rf "$target"
        MPICC=mpicc.$mpi .venv/bin/python -m pip install -q --disable-pip-version-check \
            --no-binary mpi4py --no-cache-dir --target "$target" mpi4py
        touch "$target/.built"
    fi
done
echo "setup: hpccr installed in $(pwd)/.venv (run .venv/bin/hpccr)"
