"""GPU jobs (hpccr/engine/gpu.py) without a GPU: hpccr drives a stand-in libcuda that these
tests build (gpu/standin_cuda.c), and a program that plays a CUDA process for it
(workloads/gpu_job.py: its "device memory" is a file under /dev/nvidia…, released at the
driver's checkpoint and made again at its restore, so that what a restored job finds there
came through the image).  What needs a real GPU is scripts/gpu-check.sh's."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from harness import REPO, TIMEOUT, WORKLOADS, Hpccr, TreeHarness, describe, pid_alive

from hpccr.engine import gpu
from hpccr.errors import IncompatibleMachine

STANDIN = REPO / "tests" / "gpu" / "standin_cuda.c"
GPUS = ("GPU-0a1b2c3d-0000-4000-8000-00000000000a=Stand-in H200,"
        "GPU-0a1b2c3d-0000-4000-8000-00000000000b=Stand-in H200")


@pytest.fixture(scope="session")
def standin_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("standin") / "libcuda-standin.so"
    build = subprocess.run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", str(out),
                            str(STANDIN)], capture_output=True, text=True, timeout=TIMEOUT)
    assert build.returncode == 0 and not build.stderr, build.stderr
    return out


class Driver:
    """The stand-in driver as one test sees it: its directory and its log of calls."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.device = Path(f"/dev/nvidia-hpccr-test-{uuid.uuid4().hex[:12]}")

    def calls(self) -> list[str]:
        log = self.directory / "calls"
        return log.read_text().splitlines() if log.exists() else []

    def start(self, cr: Hpccr, *extra: object):
        return cr.start("gpu_job.py", self.device, self.directory, expected_hash(), *extra,
                        append=True)


def runs_on_and_passes(job) -> None:
    """A refused or failed checkpoint left the job as it was: untouched, it runs to its end and
    passes (its kernels ran only while the driver did not hold it)."""
    job.assert_untouched()
    assert job.wait_exit() == 0, job.output()
    job.assert_passed()


def expected_hash(steps: int = 3000) -> str:
    digest = bytes(32)
    for i in range(steps):
        digest = hashlib.sha256(digest + i.to_bytes(8, "little")).digest()
    return digest.hex()


@pytest.fixture
def driver(standin_library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    directory = tmp_path / "standin"
    directory.mkdir()
    monkeypatch.setenv("HPCCR_GPU_LIBRARY", str(standin_library))
    monkeypatch.setenv("HPCCR_STANDIN_DIR", str(directory))
    monkeypatch.setenv("HPCCR_STANDIN_GPUS", GPUS)
    stand_in = Driver(directory)
    yield stand_in
    stand_in.device.unlink(missing_ok=True)


def test_gpu_process_is_checkpointed_by_the_driver_and_restored(cr: Hpccr, driver: Driver,
                                                                tmp_path: Path):
    job = driver.start(cr)
    pid = job.pid
    assert gpu.find(pid) == [gpu.GpuProcess(pid, [])]
    img = tmp_path / "img"
    res = cr.dump_and_kill(job, img)
    assert "GPU state" in res.stderr, res.stderr
    assert driver.calls() == [f"lock {pid}", f"checkpoint {pid}"]
    assert not driver.device.exists()  # released at the checkpoint: the image has its content
    meta = json.loads((img / "image.json").read_text())
    assert [p["pid"] for p in meta["gpu"]["processes"]] == [pid]
    assert meta["gpu"]["cuda_version"] == 12080
    shown = cr.run("show", img)
    assert shown.returncode == 0 and f"GPU process {pid}" in shown.stdout, describe(shown)
    cr.restore_and_pass(job, img)
    assert driver.calls()[2:] == [f"restore {pid}", f"unlock {pid}"]


def test_gpu_process_left_running_gets_its_gpu_back_and_its_image_restores(
        cr: Hpccr, driver: Driver, tmp_path: Path):
    job = driver.start(cr)
    cr.leave_running_then_restore(job, tmp_path / "img")
    pid = job.pid
    assert driver.calls() == [f"lock {pid}", f"checkpoint {pid}", f"restore {pid}",
                              f"unlock {pid}", f"restore {pid}", f"unlock {pid}"]


def test_failed_driver_checkpoint_gives_the_gpu_back(cr: Hpccr, driver: Driver, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HPCCR_STANDIN_FAIL", "checkpoint")
    job = driver.start(cr)
    img = tmp_path / "img"
    message = cr.assert_error(cr.dump(job, img), 18)
    assert f"process {job.pid} uses a GPU: cuCheckpointProcessCheckpoint: " \
           "CUDA_ERROR_ILLEGAL_STATE; the job runs on" in message
    assert driver.calls() == [f"lock {job.pid}", f"checkpoint {job.pid} failed",
                              f"unlock {job.pid}"]
    assert not img.exists()
    runs_on_and_passes(job)


def test_kernel_that_does_not_end_fails_the_checkpoint_not_the_job(
        cr: Hpccr, driver: Driver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HPCCR_GPU_LOCK_TIMEOUT", "1")
    release = tmp_path / "release"
    job = driver.start(cr, 200, release)
    job.wait_for("STUCK")
    message = cr.assert_error(cr.dump(job, tmp_path / "img"), 18)
    assert "did not lock within gpu_lock_timeout = 1 s" in message
    assert "CUDA_ERROR_TIMEOUT" in message
    assert driver.calls()[:1] == [f"lock {job.pid}"]
    release.touch()
    runs_on_and_passes(job)


def test_hpccr_killed_holding_the_gpu_state_gives_it_back(cr: Hpccr, driver: Driver,
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    job = driver.start(cr)
    monkeypatch.setenv("HPCCR_FAULT", "gpu")
    res = cr.dump(job, tmp_path / "img")
    assert res.returncode == -9, describe(res)
    cr.wait_until(lambda: f"unlock {job.pid}" in driver.calls(), "the guard's unlock")
    assert driver.calls() == [f"lock {job.pid}", f"checkpoint {job.pid}", f"restore {job.pid}",
                              f"unlock {job.pid}"]
    assert f"process {job.pid} got its GPU state back: hpccr ended mid-checkpoint" in res.stderr
    assert job.wait_exit() == 0, job.output()
    job.assert_passed()


def test_gpu_process_without_a_driver_is_refused_and_runs_on(cr: Hpccr, driver: Driver,
                                                             tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    job = driver.start(cr)
    monkeypatch.setenv("HPCCR_GPU_LIBRARY", str(tmp_path / "no-libcuda.so.1"))
    message = cr.assert_error(cr.dump(job, tmp_path / "img"), 14)
    assert f"process {job.pid} uses a GPU, and no NVIDIA driver here" in message
    message = cr.assert_error(cr.dump(job, tmp_path / "img", "--leave-stopped"), 14)
    assert "a stopped process cannot get its GPU state back" in message
    assert driver.calls() == []
    runs_on_and_passes(job)


def test_restore_of_gpu_processes_where_there_is_no_driver_is_refused_first(
        cr: Hpccr, driver: Driver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    job = driver.start(cr)
    img = tmp_path / "img"
    cr.dump_and_kill(job, img)
    with monkeypatch.context() as here:
        here.setenv("HPCCR_GPU_LIBRARY", str(tmp_path / "no-libcuda.so.1"))
        message = cr.assert_error(cr.restore(img), 16)
        assert "the image holds GPU processes, and no NVIDIA driver here" in message
        assert not pid_alive(job.pid)
    cr.restore_and_pass(job, img)


def test_periodic_checkpoints_of_a_job_with_two_gpu_processes(tree_cr: TreeHarness,
                                                              driver: Driver, tmp_path: Path):
    """hpccr run --interval: each checkpoint locks both GPU processes before it checkpoints
    either, gives both their GPU state back after, and the series restores both (the driver
    sees pids as hpccr does: outside the job's pid namespace)."""
    steps = 10000  # about 12 s: two checkpoints a second apart come long before its end
    devices = [driver.device, Path(f"{driver.device}-2")]
    command = " & ".join(f"{sys.executable} {WORKLOADS / 'gpu_job.py'} {device} "
                         f"{driver.directory} {expected_hash(steps)}" for device in devices)
    series = tmp_path / "series"
    job = tree_cr.start_job(["sh", "-c", f"{command} & wait"], "-D", series, "--interval", "1s",
                            env={"GPU_JOB_STEPS": str(steps)}, ready=False)
    try:
        def second() -> bool:
            assert job.alive(), f"the job ended before its second checkpoint:\n{job.output()}"
            latest = series / "latest"
            return latest.is_symlink() and os.readlink(latest) == "ckpt-0002"

        tree_cr.wait_until(second, "the second checkpoint")
        os.kill(job.pid, signal.SIGKILL)
        job.wait_exit(10)
        calls = driver.calls()
        rounds = [calls[i:i + 8] for i in range(0, 16, 8)]
        pids = {line.split()[1] for line in calls}
        assert len(pids) == 2, calls
        for one in rounds:  # all of a phase before any of the next
            assert [line.split()[0] for line in one] == ["lock"] * 2 + ["checkpoint"] * 2 + [
                "restore"] * 2 + ["unlock"] * 2, calls
            assert {line.split()[1] for line in one} == pids, calls
        tree_cr.wait_until(lambda: not any(map(pid_alive, map(int, pids))), "the job's end")
        res = tree_cr.restore(series)
        assert res.returncode == 0, describe(res) + "\nlog:\n" + job.output()
        assert job.lines().count("PASS") == 2 and "FAIL" not in job.output(), job.output()
    finally:
        for device in devices:
            device.unlink(missing_ok=True)


def test_gpus_of_the_image_are_paired_with_those_given():
    h200 = [gpu.Gpu(f"GPU-{i}", "NVIDIA H200") for i in "abcd"]
    a, b, c, d = h200
    assert gpu.pair_devices([a, b], [b, a, c]) == []  # all here: nothing to remap
    assert gpu.pair_devices([], []) == []
    assert gpu.pair_devices([a, b], [c, d]) == [(a, c), (b, d)]
    assert gpu.pair_devices([a, b], [b, c]) == [(a, c), (b, b)]
    with pytest.raises(IncompatibleMachine, match=r"used 2 GPU\(s\).*given 1"):
        gpu.pair_devices([a, b], [c])
    with pytest.raises(IncompatibleMachine, match="onto the same model only"):
        gpu.pair_devices([a], [gpu.Gpu("GPU-e", "NVIDIA A100-SXM4-80GB")])


def test_gpus_of_the_node_are_read_from_the_driver_information(tmp_path: Path):
    """/proc/driver/nvidia/gpus/<bus>/information, as driver 580 writes it."""
    for minor, bus in ((0, "0000:18:00.0"), (1, "0000:2a:00.0")):
        (tmp_path / bus).mkdir()
        (tmp_path / bus / "information").write_text(
            "Model: \t\t NVIDIA H200\nIRQ:   \t\t 165\n"
            f"GPU UUID: \t GPU-4f1e4a9c-2b0d-11ef-9c2e-00000000000{minor}\n"
            "Video BIOS: \t 96.00.9f.00.01\nBus Type: \t PCIe\nDMA Size: \t 52 bits\n"
            f"DMA Mask: \t 0xfffffffffffff\nBus Location: \t {bus}\nDevice Minor: \t {minor}\n"
            "GPU Firmware: \t 580.95.05\nGPU Excluded:\t No\n")
    (tmp_path / "0000:99:00.0").mkdir()  # unreadable or partial: skipped
    assert gpu.driver_gpus(str(tmp_path)) == {
        0: gpu.Gpu("GPU-4f1e4a9c-2b0d-11ef-9c2e-000000000000", "NVIDIA H200"),
        1: gpu.Gpu("GPU-4f1e4a9c-2b0d-11ef-9c2e-000000000001", "NVIDIA H200")}


def test_check_reports_the_driver_and_its_gpus(cr: Hpccr, driver: Driver,
                                               monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    res = cr.run("check", "--json")
    report = {f["name"]: f for f in json.loads(res.stdout)["features"]}
    found = report["nvidia_gpu_checkpoint"]
    assert found["status"] == "ok", found
    assert "CUDA 12.8" in found["detail"] and "2 GPUs" in found["detail"], found
    assert [g["uuid"] for g in found["gpus"]] == [s.split("=")[0] for s in GPUS.split(",")]
    monkeypatch.setenv("HPCCR_GPU_LIBRARY", str(tmp_path / "no-libcuda.so.1"))
    res = cr.run("check", "--json")
    found = {f["name"]: f for f in json.loads(res.stdout)["features"]}["nvidia_gpu_checkpoint"]
    assert found["status"] == "missing" and not found["required"], found
    assert "no NVIDIA driver here" in found["detail"], found


def test_gpu_check_on_a_real_gpu():
    """scripts/gpu-check.sh where there is a GPU, its driver's checkpoint API and PyTorch."""
    try:
        found = gpu.Driver("libcuda.so.1").devices()
    except gpu.DriverError as exc:
        pytest.skip(f"{exc} (scripts/gpu-check.sh checks a real GPU)")
    if not found:
        pytest.skip("the NVIDIA driver shows no GPU here")
    torch = subprocess.run(["python3", "-c", "import torch; assert torch.cuda.is_available()"],
                           capture_output=True, timeout=TIMEOUT)
    if torch.returncode:
        pytest.skip("python3 has no PyTorch with CUDA (scripts/gpu-check.sh needs it)")
    check = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh")], capture_output=True,
                           text=True, timeout=600)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "all phases passed" in check.stdout
