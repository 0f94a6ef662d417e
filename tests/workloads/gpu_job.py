"""Plays a CUDA process for the stand-in libcuda (tests/gpu/standin_cuda.c) on machines
without a GPU.

usage: gpu_job.py DEVICE STATE_DIR EXPECTED_HASH [STUCK_AT RELEASE]
       (environment: GPU_JOB_STEPS, 3000 if unset)

Its "device memory" is the file DEVICE (a name under /dev/nvidia…, where a GPU's device files
are, so that hpccr takes it for a GPU process), open and mapped shared.  Its "kernels" chain
sha256 over the numbers 0..GPU_JOB_STEPS-1 in that memory, one per ms (COUNT every 100, READY
after 100), with SIGUSR1 blocked: the stand-in driver's requests (STATE_DIR/<pid>.request)
are taken only between kernels.  lock: no kernel runs until unlock; checkpoint: the device
memory is copied into the process's own memory, the device closed, unmapped and removed (the
GPU released); restore: the device made again from that copy.  The state is kept in
STATE_DIR/<pid>.state.  With STUCK_AT, kernel STUCK_AT prints STUCK and runs until the file
RELEASE exists (a kernel that does not end).
The final hash must be EXPECTED_HASH, and the program must have run its kernels only unlocked.
"""

import hashlib
import mmap
import os
import signal
import sys
import time

STEPS = int(os.environ.get("GPU_JOB_STEPS", "3000"))
EVERY = 100
SIZE = 1 << 16

device_path, state_dir, expected = sys.argv[1:4]
stuck_at, release = (int(sys.argv[4]), sys.argv[5]) if len(sys.argv) > 5 else (-1, "")
pid = os.getpid()
state = "running"
host_copy = None
device_fd = memory = None
failures = []


def set_state(value: str) -> None:
    global state
    state = value
    tmp = f"{state_dir}/{pid}.state.tmp"
    with open(tmp, "w") as f:
        f.write(value)
    os.replace(tmp, f"{state_dir}/{pid}.state")


def open_device(content: bytes) -> None:
    global device_fd, memory
    device_fd = os.open(device_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(device_fd, content)
    memory = mmap.mmap(device_fd, SIZE, mmap.MAP_SHARED)


def on_request(signum, frame) -> None:
    global host_copy, device_fd, memory
    with open(f"{state_dir}/{pid}.request") as f:
        action = f.read()
    if action == "lock" and state == "running":
        set_state("locked")
    elif action == "checkpoint" and state == "locked":
        host_copy = bytes(memory)
        memory.close()
        os.close(device_fd)
        os.unlink(device_path)
        device_fd = memory = None
        set_state("checkpointed")
    elif action == "restore" and state == "checkpointed":
        open_device(host_copy)
        host_copy = None
        set_state("locked")
    elif action == "unlock" and state == "locked":
        set_state("running")
    elif action != "none":
        failures.append(f"{action} asked in state {state}")


def kernel(i: int) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    if state != "running":
        failures.append(f"kernel {i} ran {state}")
    memory[:32] = hashlib.sha256(memory[:32] + i.to_bytes(8, "little")).digest()
    if i == stuck_at:
        print("STUCK", flush=True)
        while not os.path.exists(release):
            time.sleep(0.001)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])


def main() -> int:
    open_device(bytes(SIZE))
    set_state("running")
    signal.signal(signal.SIGUSR1, on_request)
    for i in range(STEPS):
        while state != "running":
            time.sleep(0.001)  # a CUDA call waits while the driver holds the process
        kernel(i)
        if i % EVERY == 0:
            print(f"COUNT {i}", flush=True)
        if i == EVERY:
            print(f"PID {pid}\nREADY", flush=True)
        time.sleep(0.001)
    digest = memory[:32].hex()
    os.unlink(device_path)
    print(f"HASH {digest}\nPID {os.getpid()}", flush=True)
    if os.getpid() != pid:
        failures.append(f"pid {pid} became {os.getpid()}")
    if digest != expected:
        failures.append(f"hash {digest}, not {expected}")
    if failures:
        print(f"FAIL {'; '.join(failures)}", flush=True)
        return 1
    print("PASS", flush=True)
    return 0


sys.exit(main())
