"""`hpccr check`: real probes on this machine, a clean verdict, nothing left behind."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hpccr import native
from hpccr.engine import check
from hpccr.errors import CheckFailed

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TIMEOUT = 120
REQUIRED = {"ptrace_seize", "xstate", "process_vm", "pagemap", "map_files", "clone3_set_tid",
            "pr_set_mm_map", "kcmp", "pidfd_getfd", "rseq_config"}
OPTIONAL = {"ns_last_pid", "userfaultfd", "pagemap_scan", "soft_dirty", "cap_sys_resource",
            "cgroup_freezer", "userns", "yama", "timer_restore_ids", "nvidia_gpu_checkpoint"}
STATUSES = {"ok", "missing", "needs-root"}

# Becomes a child subreaper, runs `hpccr check ARGS`, then reports as JSON its exit code, output
# and every process still below it: any descendant the check left behind is reparented here.
SUBREAPER = textwrap.dedent("""
    import glob, json, subprocess, sys
    from hpccr import native
    native.syscall("prctl", 36, 1)  # PR_SET_CHILD_SUBREAPER
    run = subprocess.run([sys.executable, "-m", "hpccr", "check", *sys.argv[1:]],
                         capture_output=True, text=True, timeout=100)
    left = []
    for path in glob.glob("/proc/self/task/*/children"):
        left += open(path).read().split()
    print(json.dumps({"rc": run.returncode, "out": run.stdout, "err": run.stderr,
                      "left": left}))
""")

# Imports hpccr while the interpreter's directory (under /root here) is still readable, then
# becomes an ordinary user: uid/gid 1000, no groups, no capabilities, dumpable as usual.
AS_USER = textwrap.dedent("""
    import os, sys
    import hpccr.cli, hpccr.engine.check
    from hpccr import native
    os.setgroups([])
    os.setresgid(1000, 1000, 1000)
    os.setresuid(1000, 1000, 1000)
    native.syscall("prctl", 4, 1)  # PR_SET_DUMPABLE, which the uid change cleared
    hpccr.cli.main(sys.argv[1:], prog_name="hpccr")
""")


def _children() -> set[int]:
    out: set[int] = set()
    for path in glob.glob("/proc/self/task/*/children"):
        with open(path) as f:
            out |= {int(p) for p in f.read().split()}
    return out


def _run_check(*args: str) -> dict:
    before = _children()
    run = subprocess.run([sys.executable, "-c", SUBREAPER, *args], capture_output=True,
                         text=True, timeout=TIMEOUT, env=ENV, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert _children() == before
    result = json.loads(run.stdout)
    assert "Traceback" not in result["out"] + result["err"], result["err"]
    assert result["left"] == [], f"hpccr check left processes behind: {result['left']}"
    return result


def _leftover_cgroups() -> list[str]:
    return glob.glob("/sys/fs/cgroup/**/hpccr-check-*", recursive=True)


@pytest.fixture(scope="module")
def report() -> dict:
    result = _run_check("--json")
    assert result["rc"] == 0, result["err"]
    return json.loads(result["out"])


def test_table_and_exit_code():
    result = _run_check()
    assert result["rc"] == 0, result["out"] + result["err"]
    out = result["out"]
    assert "verdict: dump and restore will work here" in out
    assert out.splitlines()[2].split() == ["FEATURE", "NEED", "STATUS", "DETAIL"]
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()[3:] if line.strip()
            and not line.startswith("verdict")}
    assert set(rows) == REQUIRED | OPTIONAL
    for name in REQUIRED:
        assert rows[name] == ["required", "OK"], name
    assert _leftover_cgroups() == []


def test_json_lists_every_feature(report):
    features = {f["name"]: f for f in report["features"]}
    assert set(features) == REQUIRED | OPTIONAL
    for name, f in features.items():
        assert f["status"] in STATUSES, name
        assert f["required"] == (name in REQUIRED), name
        assert f["detail"], name
    assert all(features[name]["status"] == "ok" for name in REQUIRED)
    assert report["verdict"] == {"ok": True, "dump": "yes", "restore": "yes",
                                 "summary": "dump and restore will work here"}
    assert report["uid"] == os.geteuid()


def test_xstate_matches_a_regset_read_here(report):
    xstate = next(f for f in report["features"] if f["name"] == "xstate")
    pid = os.fork()
    if pid == 0:
        try:
            while True:
                signal.pause()
        finally:
            os._exit(0)
    try:
        native.seize(pid)
        native.interrupt(pid)
        os.waitpid(pid, native.WALL)
        mine = native.get_xstate(pid)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, native.WALL)
    assert xstate["xstate_size"] > 0
    assert xstate["xstate_size"] == len(mine)
    # The feature names against the CPU flags the kernel shows (an independent source).
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    assert ("avx512f" in flags) == ("AVX-512" in xstate["xfeatures"])
    assert ("amx_tile" in flags) == ("AMX" in xstate["xfeatures"])
    assert ("avx" in flags) == ("AVX" in xstate["xfeatures"])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become uid 1000")
def test_ordinary_user_is_told_restore_needs_root():
    before = _children()
    run = subprocess.run([sys.executable, "-c", AS_USER, "check"], capture_output=True,
                         text=True, timeout=TIMEOUT, env=ENV, cwd="/")
    assert _children() == before
    assert "Traceback" not in run.stdout + run.stderr, run.stderr
    assert "uid 1000" in run.stdout
    assert run.returncode == 21, run.stdout + run.stderr
    verdict = run.stdout.strip().splitlines()[-1]
    assert "restore: needs root" in verdict
    assert run.stderr.startswith("hpccr: error: as uid 1000:")
    assert "restore: needs root" in run.stderr

    run = subprocess.run([sys.executable, "-c", AS_USER, "check", "--json"],
                         capture_output=True, text=True, timeout=TIMEOUT, env=ENV, cwd="/")
    report = json.loads(run.stdout)
    features = {f["name"]: f for f in report["features"]}
    assert features["clone3_set_tid"]["status"] == "needs-root"
    assert "CAP_CHECKPOINT_RESTORE" in features["clone3_set_tid"]["detail"]
    assert report["verdict"]["restore"] == "needs root"
    assert report["verdict"]["ok"] is False
    assert _leftover_cgroups() == []


def test_a_hanging_probe_times_out_and_its_child_is_reaped(monkeypatch):
    monkeypatch.setattr(check, "PROBE_TIMEOUT", 0.5)
    made = []

    def hangs(scratch):
        made.append(scratch.child(lambda: time.sleep(60) or "late"))
        return scratch.answer(made[0]), {}

    started = time.monotonic()
    result = check.run_probe(check.Probe("hangs", True, (check.DUMP,), hangs))
    assert time.monotonic() - started < 5
    assert (result.status, result.detail) == ("missing", "no answer within 0.5 s")
    assert not os.path.exists(f"/proc/{made[0]}")
    assert made[0] not in _children()


def test_a_failing_probe_is_reported_with_its_error():
    def fails(scratch):
        pid = scratch.child(lambda: os.open("/nonexistent/hpccr", os.O_RDONLY))
        return scratch.answer(pid), {}

    def raises(scratch):
        return os.stat("/nonexistent/hpccr"), {}

    in_child = check.run_probe(check.Probe("in_child", True, (check.DUMP,), fails))
    here = check.run_probe(check.Probe("here", False, (), raises))
    assert in_child.status == here.status == "missing"
    assert in_child.detail == "/nonexistent/hpccr: No such file or directory"
    assert here.detail == "/nonexistent/hpccr: No such file or directory"
    report = check.Report([in_child, here], uid=0)
    assert report.summary() == "dump: no (in_child) / restore: yes"
    with pytest.raises(CheckFailed, match="required kernel features missing: in_child"):
        report.raise_if_failed()
