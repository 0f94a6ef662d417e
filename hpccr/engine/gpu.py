"""GPU processes (NVIDIA): the driver's own checkpoint API (libcuda of driver 550 and later,
cuCheckpointProcess*) moves a CUDA process's device memory and GPU state into the process's
host memory and releases its GPUs; the process is then an ordinary one to dump.

A dump finds the tree's GPU processes (a /dev/nvidia* descriptor or mapping), locks them all at
once, each within the site's gpu_lock_timeout (a kernel that never ends must not hang the
checkpoint), then checkpoints them all at once, before the freeze.  Should anything fail, and
when the job is left running, they are restored and unlocked: the job goes on as before.  A
restore, once the processes run again, restores them onto the GPUs this job was given (the
image's GPUs paired by UUID with those the driver shows here) and unlocks them.

libcuda is loaded (cffi, ABI mode) only when a job uses a GPU: hpccr needs no NVIDIA software.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial

import cffi

from hpccr import config
from hpccr.engine import procfs, tree
from hpccr.errors import (
    DumpFailed,
    HpccrError,
    ImageCorrupt,
    IncompatibleMachine,
    RestoreFailed,
    UnsupportedResource,
)

DEVICE_PREFIX = "/dev/nvidia"  # nvidiactl, nvidia-uvm, nvidia<N>: any of them is a GPU user
NVIDIA_MAJOR = 195
FIRST_CONTROL_MINOR = 254  # 254 nvidia-modeset, 255 nvidiactl; below, one minor per GPU
DRIVER_GPUS = "/proc/driver/nvidia/gpus"  # one directory per GPU, each with 'information'
DRIVER_VERSION = "/sys/module/nvidia/version"
# CUprocessState
LOCKED, CHECKPOINTED = 1, 2
STATES = ("running", "locked", "checkpointed", "failed", "checkpointing", "restoring")
SETTLING = ("checkpointing", "restoring")  # a call under way: its end is waited for
CUDA_ERROR_NO_DEVICE = 100
CHECKPOINT_API = ("cuCheckpointProcessGetState", "cuCheckpointProcessLock",
                  "cuCheckpointProcessCheckpoint", "cuCheckpointProcessRestore",
                  "cuCheckpointProcessUnlock")

# cuda.h (CUDA 12.8 and later): every *Args structure is 64 bytes, reserved parts zeroed.
CDEF = """
typedef int CUresult;
typedef int CUdevice;
typedef struct { unsigned char bytes[16]; } CUuuid;
typedef struct { unsigned int timeoutMs; unsigned int reserved0; uint64_t reserved1[7]; }
    CUcheckpointLockArgs;
typedef struct { uint64_t reserved[8]; } CUcheckpointCheckpointArgs;
typedef struct { CUuuid oldUuid; CUuuid newUuid; } CUcheckpointGpuPair;
typedef struct { CUcheckpointGpuPair *gpuPairs; unsigned int gpuPairsCount; char reserved[44];
                 uint64_t reserved1; } CUcheckpointRestoreArgs;
typedef struct { uint64_t reserved[8]; } CUcheckpointUnlockArgs;
CUresult cuInit(unsigned int flags);
CUresult cuDriverGetVersion(int *version);
CUresult cuGetErrorName(CUresult error, const char **name);
CUresult cuDeviceGetCount(int *count);
CUresult cuDeviceGet(CUdevice *device, int ordinal);
CUresult cuDeviceGetName(char *name, int len, CUdevice device);
CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice device);
CUresult cuCheckpointProcessGetState(int pid, int *state);
CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args);
CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args);
CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args);
CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args);
"""


class DriverError(HpccrError):
    """A libcuda call failed; the message names the call and the driver's error."""


@dataclass(frozen=True)
class Gpu:
    uuid: str  # GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx, as nvidia-smi shows it
    model: str

    def record(self) -> dict:
        return {"uuid": self.uuid, "model": self.model}


class Driver:
    """NVIDIA's libcuda: as much of it as finding GPUs and checkpoints need."""

    def __init__(self, library: str):
        self.library = library
        self.ffi = cffi.FFI()
        self.ffi.cdef(CDEF)
        try:
            self.lib = self.ffi.dlopen(library)
        except OSError as exc:
            reason = str(exc).split(".  Additionally")[0].rsplit(": ", 1)[-1]
            raise DriverError(f"no NVIDIA driver here: {library} cannot be loaded ({reason})"
                              ) from None
        missing = [name for name in CHECKPOINT_API if not hasattr(self.lib, name)]
        if missing:
            raise DriverError(f"the NVIDIA driver's {library} has no checkpoint API "
                              f"({missing[0]}: driver 550 or later needed)")
        version = self.ffi.new("int *")
        self._call("cuDriverGetVersion", version)
        self.cuda_version = version[0]
        # CUDA_VISIBLE_DEVICES as Slurm (the job's allocation, in a prolog's and so the job
        # agent's environment) and nvidia-smi number GPUs: in PCI bus order.
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        result = self.lib.cuInit(0)
        self.has_devices = result != CUDA_ERROR_NO_DEVICE
        if result not in (0, CUDA_ERROR_NO_DEVICE):
            raise DriverError(f"cuInit: {self.error_name(result)}")

    def error_name(self, result: int) -> str:
        name = self.ffi.new("const char **")
        if self.lib.cuGetErrorName(result, name) == 0 and name[0] != self.ffi.NULL:
            return self.ffi.string(name[0]).decode(errors="replace")
        return f"CUDA error {result}"

    def _call(self, function: str, *args) -> None:
        result = getattr(self.lib, function)(*args)
        if result:
            raise DriverError(f"{function}: {self.error_name(result)}")

    def devices(self) -> list[Gpu]:
        """The GPUs this process may use (CUDA_VISIBLE_DEVICES, the job's allocation)."""
        if not self.has_devices:
            return []
        count, device = self.ffi.new("int *"), self.ffi.new("CUdevice *")
        uuid, name = self.ffi.new("CUuuid *"), self.ffi.new("char[256]")
        self._call("cuDeviceGetCount", count)
        gpus = []
        for ordinal in range(count[0]):
            self._call("cuDeviceGet", device, ordinal)
            self._call("cuDeviceGetName", name, 256, device[0])
            self._call("cuDeviceGetUuid", uuid, device[0])
            gpus.append(Gpu(format_uuid(bytes(uuid.bytes)), self.ffi.string(name).decode()))
        return gpus

    def state(self, pid: int) -> str:
        value = self.ffi.new("int *")
        self._call("cuCheckpointProcessGetState", pid, value)
        return STATES[value[0]] if 0 <= value[0] < len(STATES) else f"state {value[0]}"

    def lock(self, pid: int, timeout_s: int) -> None:
        args = self.ffi.new("CUcheckpointLockArgs *", {"timeoutMs": timeout_s * 1000})
        self._call("cuCheckpointProcessLock", pid, args)

    def checkpoint(self, pid: int) -> None:
        self._call("cuCheckpointProcessCheckpoint", pid, self.ffi.NULL)

    def restore(self, pid: int, pairs: list[tuple[Gpu, Gpu]]) -> None:
        args = self.ffi.new("CUcheckpointRestoreArgs *")
        if pairs:
            table = self.ffi.new("CUcheckpointGpuPair[]", len(pairs))
            for i, (old, new) in enumerate(pairs):
                table[i].oldUuid.bytes = parse_uuid(old.uuid)
                table[i].newUuid.bytes = parse_uuid(new.uuid)
            args.gpuPairs, args.gpuPairsCount = table, len(pairs)
        self._call("cuCheckpointProcessRestore", pid, args)

    def unlock(self, pid: int) -> None:
        self._call("cuCheckpointProcessUnlock", pid, self.ffi.NULL)


@cache
def driver(library: str) -> Driver:
    """The driver, loaded once per hpccr process (cuInit costs seconds on some nodes)."""
    return Driver(library)


def format_uuid(raw: bytes) -> str:
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def parse_uuid(text: str) -> bytes:
    return bytes.fromhex(text.removeprefix("GPU-").replace("-", ""))


def driver_version() -> str | None:
    """The kernel driver's version (580.95.05, say), None without one."""
    try:
        with open(DRIVER_VERSION) as f:
            return f.read().strip()
    except OSError:
        return None


def driver_gpus(root: str = DRIVER_GPUS) -> dict[int, Gpu]:
    """The node's GPUs by device minor (/dev/nvidia<minor>), from the driver's /proc files:
    what the processes' descriptors name, before the driver's checkpoint closes them."""
    gpus = {}
    try:
        entries = os.listdir(root)
    except OSError:
        return gpus
    for entry in entries:
        fields = {}
        try:
            with open(os.path.join(root, entry, "information")) as f:
                for line in f:
                    key, _, value = line.partition(":")
                    fields[key.strip()] = value.strip()
            gpus[int(fields["Device Minor"])] = Gpu(fields["GPU UUID"], fields["Model"])
        except (OSError, KeyError, ValueError):
            continue
    return gpus


def gpu_use(pid: int) -> set[int] | None:
    """None if `pid` uses no GPU; else the minors of the GPUs whose devices it has open."""
    minors, found = set(), False
    for fd in procfs.fds(pid):
        link = procfs.path(pid, "fd", str(fd))
        try:
            if not os.readlink(link).startswith(DEVICE_PREFIX):
                continue
            found = True
            st = os.stat(link)
        except FileNotFoundError:
            continue  # closed meanwhile
        if (stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == NVIDIA_MAJOR
                and os.minor(st.st_rdev) < FIRST_CONTROL_MINOR):
            minors.add(os.minor(st.st_rdev))
    if not found:
        found = any(entry.name.startswith(DEVICE_PREFIX)
                    for entry in procfs.maps(pid))
    return minors if found else None


@dataclass
class GpuProcess:
    pid: int  # as hpccr sees it
    devices: list[Gpu]  # the GPUs it had open; empty when the driver's /proc tells nothing


def find(root: int) -> list[GpuProcess]:
    """The processes of the tree of `root` that use a GPU."""
    found, pending, gpus = [], [root], None
    while pending:
        pid = pending.pop()
        try:
            pending += tree.children(pid)
            minors = gpu_use(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
        if minors is not None:
            gpus = driver_gpus() if gpus is None else gpus
            found.append(GpuProcess(pid, [gpus[m] for m in sorted(minors) if m in gpus]))
    return sorted(found, key=lambda p: p.pid)


def _all(call, pids: list[int]) -> dict[int, Exception]:
    """`call(pid)` for every pid at once (libcuda's calls release the GIL): the failures."""
    with ThreadPoolExecutor(max_workers=min(len(pids), 32)) as pool:
        futures = {pid: pool.submit(call, pid) for pid in pids}
    failed = {}
    for pid, future in futures.items():
        exc = future.exception()
        if exc is not None:
            if not isinstance(exc, HpccrError):
                raise exc
            failed[pid] = exc
    return failed


class Suspension:
    """The GPU processes of a tree, their GPU state moved into their memory by the driver for
    the time of a dump; an empty one (no GPU process) does nothing and loads nothing."""

    def __init__(self, root: int, mode: str):
        self.processes = find(root)
        self.held: list[int] = []  # locked, maybe checkpointed: to be given back their GPUs
        self.seconds = 0.0  # the driver's time, both ways
        self.guard: subprocess.Popen | None = None
        if not self.processes:
            return
        if mode == "stopped":
            raise UnsupportedResource(
                f"process {self.processes[0].pid} uses a GPU: a stopped process cannot get "
                "its GPU state back (the driver needs it running): dump it left running, "
                "or killed")
        settings = config.load()
        self.timeout_s = settings.gpu_lock_timeout
        self.library = settings.gpu_library
        try:
            self.driver = driver(self.library)
        except DriverError as exc:
            raise UnsupportedResource(f"process {self.processes[0].pid} uses a GPU, and {exc}: "
                                      "it cannot be checkpointed") from None

    def __bool__(self) -> bool:
        return bool(self.processes)

    def suspend(self) -> None:
        """Lock all, then checkpoint all; on any failure give back what was taken and raise."""
        started = time.monotonic()
        pids = [p.pid for p in self.processes]
        self.guard = subprocess.Popen(  # gives them back should this hpccr die holding them
            [sys.executable, "-m", __name__, self.library, *map(str, pids)],
            stdin=subprocess.PIPE, start_new_session=True)
        self.held = pids
        try:
            failed = _all(self._lock, pids)
            if not failed:
                failed = _all(self.driver.checkpoint, pids)
            if not failed:
                failed = {pid: DumpFailed("its GPU devices are still open after the driver's "
                                          "checkpoint") for pid in pids if gpu_use(pid) is not None}
        except BaseException:
            self.resume()
            raise
        self.seconds += time.monotonic() - started
        if failed:
            pid, exc = min(failed.items())
            try:
                self.resume()
            except DumpFailed as lost:
                raise DumpFailed(f"process {pid} uses a GPU: {exc}; and {lost}") from None
            raise DumpFailed(f"process {pid} uses a GPU: {exc}; the job runs on") from None

    def _lock(self, pid: int) -> None:
        try:
            self.driver.lock(pid, self.timeout_s)
        except DriverError as exc:
            raise DriverError(f"it did not lock within gpu_lock_timeout = {self.timeout_s} s "
                              f"(a GPU kernel that does not end?): {exc}") from None

    def resume(self) -> None:
        """Give every held process its GPU state back and let it run its GPU work again."""
        started = time.monotonic()
        failed = _all(partial(give_back, self.driver), self.held)
        self.held = []
        self.seconds += time.monotonic() - started
        self.release()
        failed = {pid: exc for pid, exc in failed.items()
                  if os.path.isdir(procfs.path(pid))}  # else it ended: nothing waits
        if failed:
            pid, exc = min(failed.items())
            raise DumpFailed(f"process {pid}: its GPU state could not be given back ({exc}); "
                             "it waits, locked by the driver")

    def release(self) -> None:
        """The held processes are no longer this hpccr's to give back (given back, or killed
        by a complete dump): the guard ends without touching them."""
        if self.guard is not None:
            self.guard.communicate(b"done\n")
            self.guard = None

    def record(self, image_pid) -> dict:
        """image.json's "gpu": the driver and, per process (its pid in the image), its GPUs."""
        return {"cuda_version": self.driver.cuda_version, "driver": driver_version(),
                "checkpoint_s": round(self.seconds, 6),
                "processes": [{"pid": image_pid(p.pid), "devices": [g.record() for g in p.devices]}
                              for p in self.processes]}


def give_back(drv: Driver, pid: int) -> bool:
    """Whatever the driver holds of `pid` (locked, checkpointed) back to running; False if it
    held nothing."""
    state = drv.state(pid)
    while state in SETTLING:
        time.sleep(0.01)  # the driver's call under way ends by itself
        state = drv.state(pid)
    if state == "checkpointed":
        drv.restore(pid, [])
        state = drv.state(pid)
    if state == "locked":
        drv.unlock(pid)
        return True
    return False


def pair_devices(used: list[Gpu], given: list[Gpu]) -> list[tuple[Gpu, Gpu]]:
    """How the image's GPUs map onto those given here: none to remap when all are here;
    else each image GPU to one given here (its own if here, the next free one else) of the
    same model.  Raises IncompatibleMachine when that cannot be."""
    given_ids = {g.uuid for g in given}
    if all(g.uuid in given_ids for g in used):
        return []
    if len(given) < len(used):
        raise IncompatibleMachine(
            f"the image's processes used {len(used)} GPU(s) ({', '.join(g.uuid for g in used)}); "
            f"this job was given {len(given)} (CUDA_VISIBLE_DEVICES, the job's allocation)")
    free = [g for g in given if g.uuid not in {u.uuid for u in used}]
    pairs = []
    for old in used:
        new = old if old.uuid in given_ids else free.pop(0)
        if new.model != old.model:
            raise IncompatibleMachine(f"GPU {old.uuid} ({old.model}) of the image would go to "
                                      f"{new.uuid} ({new.model}): the driver restores a GPU's "
                                      "state onto the same model only")
        pairs.append((old, new))
    return pairs


class Placement:
    """Where an image's GPU processes go here; made before any process exists, so that a node
    without the driver or without the GPUs refuses the restore at once."""

    def __init__(self, record: dict, image_pids: set[int]):
        """`record`: image.json's "gpu", checked by the image's schema."""
        self.pids = [p["pid"] for p in record["processes"]]
        if not set(self.pids) <= image_pids:
            raise ImageCorrupt("image.json: gpu: a process not in the image (image corrupted)")
        try:
            self.driver = driver(config.load().gpu_library)
        except DriverError as exc:
            raise IncompatibleMachine(f"the image holds GPU processes, and {exc}") from None
        used = list(dict.fromkeys(Gpu(d["uuid"], d["model"]) for p in record["processes"]
                                  for d in p["devices"]))
        self.pairs = pair_devices(used, self.driver.devices())

    def resume(self, outer: dict[int, int]) -> float:
        """Give the restored processes (`outer`: image pid → pid here) their GPU state back
        and unlock them; the driver's time."""
        started = time.monotonic()
        failed = _all(self._resume, [outer[pid] for pid in self.pids])
        if failed:
            pid, exc = min(failed.items())
            raise RestoreFailed(f"process {pid}: its GPU state could not be restored ({exc})")
        return time.monotonic() - started

    def _resume(self, pid: int) -> None:
        self.driver.restore(pid, self.pairs)
        self.driver.unlock(pid)


def _guard(library: str, pids: list[int]) -> int:
    """The guard of a dump's GPU processes (Suspension.suspend): waits for its hpccr's word
    that they are no longer its own; should its hpccr end without it, gives them back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.stdin.buffer.read() == b"done\n":
        return 0
    drv = driver(library)
    for pid in pids:
        try:
            held = give_back(drv, pid)
        except DriverError as exc:
            if os.path.isdir(procfs.path(pid)):  # else killed by a dump that was complete
                print(f"hpccr: error: process {pid}: its GPU state could not be given back after "
                      f"hpccr ended mid-checkpoint ({exc})", file=sys.stderr)
            continue
        if held:
            print(f"hpccr: warning: process {pid} got its GPU state back: hpccr ended "
                  "mid-checkpoint", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_guard(sys.argv[1], [int(pid) for pid in sys.argv[2:]]))
