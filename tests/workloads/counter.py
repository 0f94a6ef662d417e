"""A Python interpreter mid-loop: counts and hashes, and must continue where it was.

usage: counter.py EXPECTED_HASH

Chains sha256 over the numbers 0..2999, sleeping 1 ms per step, and prints "COUNT <i>" every
100 steps (READY after COUNT 100).  After a restore the counts must go on from where they were,
never from 0, and the final hash must be EXPECTED_HASH.
"""

import hashlib
import os
import sys
import time

STEPS = 3000
EVERY = 100


def main() -> int:
    pid = os.getpid()
    digest = b""
    for i in range(STEPS):
        digest = hashlib.sha256(digest + i.to_bytes(8, "little")).digest()
        if i % EVERY == 0:
            print(f"COUNT {i}", flush=True)
        if i == EVERY:
            print(f"PID {pid}\nREADY", flush=True)
        time.sleep(0.001)
    print(f"HASH {digest.hex()}\nPID {os.getpid()}", flush=True)
    if os.getpid() != pid:
        failure = f"pid {pid} became {os.getpid()}"
    elif digest.hex() != sys.argv[1]:
        failure = f"hash {digest.hex()}, not {sys.argv[1]}"
    else:
        print("PASS", flush=True)
        return 0
    print(f"FAIL {failure}", flush=True)
    return 1


sys.exit(main())
