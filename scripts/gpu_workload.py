"""The GPU check's job (scripts/gpu-check.sh): a PyTorch program whose result is known.

usage: gpu_workload.py GIB STEPS

Fills GIB GiB of GPU memory with int64 numbers x0[i] = i mod P and runs STEPS steps, each two
kernels on two CUDA streams at once: the first half becomes (31 x + step) mod P, the second
(17 x + step) mod P.  Every element then ends as (A x0 + B) mod P with A and B computed on the
host, so the end checks each element exactly ("CHECK OK"), not a sum.  Prints "STEP k" every 50
steps (READY after the first 50), and its pid.  Kernels run all the time, so a checkpoint comes
while one runs.
"""

import os
import sys
import time

import torch

P = 1_000_003
FACTORS = (31, 17)


def expected(factor: int, steps: int) -> tuple[int, int]:
    """(A, B) with x_steps = (A x0 + B) mod P for x -> (factor x + step) mod P, step = 0.."""
    a, b = 1, 0
    for step in range(steps):
        a, b = a * factor % P, (b * factor + step) % P
    return a, b


def main() -> int:
    gib, steps = int(sys.argv[1]), int(sys.argv[2])
    n = (gib << 30) // 8
    half = n // 2
    print(f"PID {os.getpid()} on {torch.cuda.get_device_name(0)}", flush=True)
    x = torch.arange(n, dtype=torch.int64, device="cuda") % P
    parts = (x[:half], x[half:])
    streams = (torch.cuda.Stream(), torch.cuda.Stream())
    torch.cuda.synchronize()
    started = time.monotonic()
    for step in range(steps):
        for part, stream, factor in zip(parts, streams, FACTORS, strict=True):
            with torch.cuda.stream(stream):
                part.mul_(factor).add_(step).remainder_(P)
        if step % 50 == 49:
            for stream in streams:
                stream.synchronize()
            print(f"STEP {step + 1} at {time.monotonic() - started:.1f} s", flush=True)
            if step == 49:
                print("READY", flush=True)
    torch.cuda.synchronize()
    x0 = torch.arange(n, dtype=torch.int64, device="cuda") % P
    wrong = 0
    for part, start, factor in zip(parts, (0, half), FACTORS, strict=True):
        a, b = expected(factor, steps)
        want = (x0[start:start + part.numel()] * a + b) % P
        wrong += int((part != want).sum())
    if wrong:
        print(f"CHECK FAILED: {wrong} of {n} elements differ", flush=True)
        return 1
    print(f"CHECK OK: {n} elements, {gib} GiB", flush=True)
    return 0


sys.exit(main())
