"""An mpi4py job: each step every rank passes a block to its right neighbour and gets one from
its left (a ring exchange), folds a hash of it into its state, and the ranks add up their states
(allreduce); rank 0 prints "STEP <i> <sum>" every step and "DONE <sum>" at the end.  A run that
was checkpointed and restored must print exactly what an uninterrupted run prints.  Each rank
also holds MIB MiB of memory of its own (written, so that it is really there).

usage: ring.py MPI4PY_DIR STEPS [MIB]   (MPI4PY_DIR: mpi4py built against the launcher's MPI)
"""

import hashlib
import sys
import time

sys.path.insert(0, sys.argv[1])

from mpi4py import MPI  # noqa: E402 - from the directory given

BLOCK = 1 << 17  # bytes passed each step
MASK = (1 << 64) - 1


def main() -> None:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    steps = int(sys.argv[2])
    ballast = bytearray(b"\x5a") * ((int(sys.argv[3]) if len(sys.argv) > 3 else 0) << 20)
    state = hashlib.sha256(f"rank {rank}".encode()).digest()
    total = 0
    for step in range(steps):
        block = hashlib.sha256(state + step.to_bytes(8, "little")).digest() * (BLOCK // 32)
        got = comm.sendrecv(block, dest=(rank + 1) % size, source=(rank - 1) % size)
        state = hashlib.sha256(state + got).digest()
        if ballast:
            ballast[(step * 4096) % len(ballast)] = state[0]
        total = comm.allreduce(int.from_bytes(state[:8], "little"), op=MPI.SUM) & MASK
        if rank == 0:
            print(f"STEP {step} {total}", flush=True)
        time.sleep(0.01)
    if rank == 0:
        print(f"DONE {total}", flush=True)


main()
