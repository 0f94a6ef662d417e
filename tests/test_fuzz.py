"""Hostile and broken images: a fuzzer mutates real images of a job and restores each mutant.
Every case must end in a clear error with a documented exit code (or, for a harmless mutation,
a job that runs): never a Python traceback, a hang or a process left behind.

The mutations: files truncated or with bytes flipped, files replaced by symlinks (to a file of
root's) or removed; image.json edited — a value replaced by one of the wrong type, a huge or
negative number, a path leading out (`..`, /etc/shadow), a key removed, a list repeated into an
absurd count (threads, mappings, descriptors...).  Most mutants get their checksums rewritten,
as an attacker would, so that what is checked past the checksums is checked too.

CI runs CASES mutants with a fixed seed; `HPCCR_FUZZ_CASES=N HPCCR_FUZZ_SEED=S` runs more (the
long mode, by hand).  Each restore runs in a child forked from the test (no interpreter start
per case).

Workload: workloads/tree_counter.c under hpccr run (a job: two processes, pipes, files).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import select
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import xxhash

from hpccr import native
from hpccr.cli import main  # imported once, with the restore: each case's child has them
from hpccr.engine import restore  # noqa: F401

CASES = int(os.environ.get("HPCCR_FUZZ_CASES", "2000"))
SEED = int(os.environ.get("HPCCR_FUZZ_SEED", "20261204"))
CASE_TIMEOUT = 60  # seconds: a restore that takes longer hangs
DOCUMENTED = {0, 2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20}  # README's table, 0: restored
CHECKSUMS = "checksums"
PR_SET_CHILD_SUBREAPER = 36
HOSTILE = [None, True, -1, -(2 ** 63), 2 ** 63, 2 ** 64 + 1, 1e308, "", "../../etc/shadow",
           "/etc/shadow", "x" * 5000, [], {}, [1, 2, 3], {"a": 1}, "\u0000", 0, 1, 4096,
           "/proc/1/environ"]


@pytest.fixture(scope="module")
def images(tmp_path_factory, workload_binaries):
    """One image of a job (hpccr run), made once for the module."""
    import subprocess

    from harness import JOB_PID, cli_argv, cli_env

    base = tmp_path_factory.mktemp("fuzz")
    log = base / "job.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cli_argv("run", "--", workload_binaries["tree_counter"], 100000,
                                         20), stdout=out, stderr=out, start_new_session=True,
                                stdin=subprocess.DEVNULL, env=cli_env())
    try:
        deadline = time.monotonic() + 60
        while "COUNT 3" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        pid = next(int(line.split()[-1]) for line in log.read_text().splitlines()
                   if line.startswith(JOB_PID))
        res = subprocess.run(cli_argv("dump", pid, "-D", base / "img"), capture_output=True,
                             text=True, env=cli_env(), timeout=120)
        assert res.returncode == 0, res.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return base / "img"


def json_paths(value, path=()):
    """Every path (a tuple of keys and indexes) into a JSON value."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from json_paths(item, (*path, i))


def rewrite_checksums(img: Path) -> None:
    """The checksums file as a writer would make it for the files there now."""
    lines = []
    for f in sorted(img.iterdir(), key=lambda f: f.name):
        if f.name == CHECKSUMS or f.is_symlink() or not f.is_file():
            continue
        data = f.read_bytes()
        lines.append(f"xxh3-128 {xxhash.xxh3_128_hexdigest(data)}  {len(data)}  {f.name}\n")
    (img / CHECKSUMS).unlink(missing_ok=True)  # it may be a mutant's symlink
    (img / CHECKSUMS).write_text("".join(lines))


def mutate(original: Path, target: Path, rng: random.Random) -> str:
    """A mutant of the image at `original` in `target`; what was done."""
    shutil.copytree(original, target, symlinks=True)
    files = sorted(f for f in target.iterdir() if f.is_file())
    kind = rng.choice(["json", "json", "json", "json", "truncate", "flip", "symlink", "remove"])
    what = kind
    if kind == "json":
        meta_path = target / "image.json"
        meta = json.loads(meta_path.read_text())
        paths = list(json_paths(meta))[1:]
        path = rng.choice(paths)
        parent = meta
        for key in path[:-1]:
            parent = parent[key]
        action = rng.choice(["replace", "replace", "replace", "remove", "repeat"])
        if action == "remove" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "repeat" and isinstance(parent[path[-1]], list) and parent[path[-1]]:
            parent[path[-1]] = [copy.deepcopy(parent[path[-1]][0])] * rng.choice([2, 64, 5000])
        else:
            action = "replace"
            parent[path[-1]] = rng.choice(HOSTILE)
        what = f"json {action} {'/'.join(map(str, path))}"
        meta_path.write_text(json.dumps(meta))
    elif kind == "truncate":
        victim = rng.choice(files)
        size = victim.stat().st_size
        with open(victim, "r+b") as f:
            f.truncate(rng.randrange(size) if size else 0)
        what = f"truncate {victim.name}"
    elif kind == "flip":
        victim = rng.choice(files)
        data = bytearray(victim.read_bytes())
        for _ in range(rng.randint(1, 8)):
            if data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        victim.write_bytes(bytes(data))
        what = f"flip {victim.name}"
    elif kind == "symlink":
        victim = rng.choice(files)
        victim.unlink()
        victim.symlink_to(rng.choice(["/etc/shadow", "/proc/self/environ", "/dev/zero"]))
        what = f"symlink {victim.name}"
    else:
        victim = rng.choice(files)
        victim.unlink()
        what = f"remove {victim.name}"
    if rng.random() < 0.8 and kind != "remove":
        rewrite_checksums(target)
        what += " (checksums rewritten)"
    return what


def restore_in_child(img: Path, pidfile: Path) -> tuple[int | None, str]:
    """`hpccr restore -D img --detach --pidfile` run in a forked child of this test: its exit
    status (None: it hung) and what it wrote."""
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(rd)
            os.dup2(wr, 1)
            os.dup2(wr, 2)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.setsid()
            # What pytest put in place of sys.stdout and sys.stderr captures, not the pipe.
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
            try:
                main(["restore", "-D", str(img), "--detach", "--pidfile", str(pidfile)])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # a bug: its traceback is the output
            import traceback

            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(wr)
    out = io.BytesIO()
    deadline = time.monotonic() + CASE_TIMEOUT
    while True:
        ready, _, _ = select.select([rd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(rd)
            return None, out.getvalue().decode(errors="replace")
        chunk = os.read(rd, 65536)
        if not chunk:
            break
        out.write(chunk)
    os.close(rd)
    status = os.waitpid(pid, 0)[1]
    return os.waitstatus_to_exitcode(status), out.getvalue().decode(errors="replace")


def children_left() -> list[int]:
    """Our children still running once the exited ones are reaped: with this process a child
    subreaper, whatever a restore left behind ends up here."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    left = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            left += [int(pid) for pid in (task / "children").read_text().split()]
    return left


@pytest.fixture
def subreaper():
    native.syscall("prctl", PR_SET_CHILD_SUBREAPER, 1)
    yield
    native.syscall("prctl", PR_SET_CHILD_SUBREAPER, 0)


def test_mutated_images_fail_cleanly(images, tmp_path, subreaper):
    rng = random.Random(SEED)
    failures, codes = [], {}
    assert not children_left()
    for case in range(CASES):
        mutant, pidfile = tmp_path / f"m{case}", tmp_path / f"m{case}.pid"
        what = mutate(images, mutant, rng)
        code, output = restore_in_child(mutant, pidfile)
        codes[code] = codes.get(code, 0) + 1
        if code == 0 and pidfile.exists():  # harmless: the job runs (our child now); stop it
            job = int(pidfile.read_text())
            os.kill(job, signal.SIGKILL)
            os.waitpid(job, 0)
        lines = [line for line in output.splitlines() if not line.startswith("hpccr: warning:")]
        if code is None:
            failures.append(f"case {case} ({what}): hung")
        elif code not in DOCUMENTED or "Traceback" in output:
            failures.append(f"case {case} ({what}): exit {code}:\n{output[-3000:]}")
        elif code != 0 and (len(lines) != 1 or not lines[0].startswith("hpccr: error: ")):
            failures.append(f"case {case} ({what}): exit {code}, not one error line:\n{output}")
        left = children_left()
        if left:
            failures.append(f"case {case} ({what}): processes left: {left}")
            for pid in left:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        shutil.rmtree(mutant, ignore_errors=True)
        if len(failures) >= int(os.environ.get("HPCCR_FUZZ_MAX_FAILURES", "5")):
            break
    print(f"fuzz: {case + 1} cases, seed {SEED}, exit codes {sorted(codes.items(), key=str)}")
    assert not failures, "\n\n".join(failures)
