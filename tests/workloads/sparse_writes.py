"""64 MiB of anonymous memory of which only every other MiB was ever written.

Prints "ADDR <address of the mapping>" and READY, then waits for SIGUSR1 and checks every block: a
written one holds its own byte value, an unwritten one reads as zeros (PASS, or FAIL and the
first block that differs).  Its test compares the mapping's resident pages before the dump
and after the restore: the unwritten half must not have become resident.
"""

import ctypes
import mmap
import signal

SIZE, BLOCK = 64 << 20, 1 << 20


def value(block: int) -> bytes:
    return bytes([block % 251 + 1]) * BLOCK


def main() -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    area = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for block in range(0, SIZE // BLOCK, 2):
        area[block * BLOCK:(block + 1) * BLOCK] = value(block)
    address = ctypes.addressof(ctypes.c_char.from_buffer(area))
    print(f"ADDR {address:#x}\nREADY", flush=True)
    signal.sigwait({signal.SIGUSR1})
    for block in range(SIZE // BLOCK):
        want = value(block) if block % 2 == 0 else bytes(BLOCK)
        if area[block * BLOCK:(block + 1) * BLOCK] != want:
            print(f"FAIL block {block} differs", flush=True)
            return 1
    print("PASS", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
