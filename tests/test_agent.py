"""The per-job agent (`hpccr slurm agent`, hpccr/slurm/agent.py) without Slurm: root serves one
session on <run_dir>/agent-JOB.NODE.sock to the job's user only, runs or restores the job for
that user in the client's cgroups, on the client's own stdio, passes on its signals and sends
the exit status back; then it is gone, its socket and pid file with it.

The client is a real process of hpcuser (or nobody) in a cgroup of its own; the job is
workloads/tree_counter.c STEPS STEP_MS (COUNT 0 .. STEPS-1 once each, PASS if nothing was lost,
repeated or restarted).
"""

import json
import os
import pwd
import random
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
from harness import (  # noqa: F401 - the fixtures shared_dir and user_python
    TIMEOUT,
    USER,
    cli_argv,
    cli_env,
    pid_alive,
    proc_status,
    shared_dir_fixture,
    tree_of,
    user_python_fixture,
    wait_until,
)

from hpccr.slurm.agent import PASSED_FDS

STOPPED = 75
JOB_ID, NODE = "4242", "node7"
PW = pwd.getpwnam(USER)
CGROUPS = Path("/sys/fs/cgroup")

# The batch step's side, as hpcuser: wait to be moved into the test's cgroup, then one session.
SESSION_CLIENT = """
import json, sys, time
from pathlib import Path
from hpccr.errors import HpccrError
from hpccr.slurm.agent import AgentSession
path, request, cgroup = sys.argv[1:]
while cgroup not in Path("/proc/self/cgroup").read_text():
    time.sleep(0.01)
def on_event(event, fields):
    print(f"client: event {event} {json.dumps(fields)}", file=sys.stderr, flush=True)
try:
    session = AgentSession(Path(path), json.loads(request), on_event)
except HpccrError as exc:
    print(f"client: error {exc}", file=sys.stderr, flush=True)
    sys.exit(exc.exit_code)
print(f"client: started {session.pid}", file=sys.stderr, flush=True)
code = session.wait()
print(f"client: exit {code}", file=sys.stderr, flush=True)
sys.exit(code)
"""

# A bare client (stdlib only): one request with the first N of its fds 0, 1, 2 and an events
# socket, then the reply.
RAW_CLIENT = """
import array, json, os, socket, sys
path, request, nfds = sys.argv[1], sys.argv[2], int(sys.argv[3])
kind = sys.argv[4] if len(sys.argv) > 4 else "seqpacket"
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(path)
if kind == "seqpacket":
    events, far_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
elif kind == "stream":
    events, far_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
elif kind == "udp":
    far_end = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
elif kind == "pipe":
    far_end = open(os.pipe()[1], "wb")
else:
    far_end = open(kind, "rb")
if request:
    fds = array.array("i", [0, 1, 2, far_end.fileno()][:nfds])
    s.sendmsg([request.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)] if nfds else [])
print(s.recv(1 << 16).decode(), flush=True)
"""


def catches(pid: int, sig: int) -> bool:
    return bool(int(proc_status(pid)["SigCgt"], 16) & (1 << (sig - 1)))


def counts(lines: list[str]) -> list[int]:
    return [int(line.split()[1]) for line in lines if line.startswith("COUNT ")]


class Agent:
    """``hpccr slurm agent`` for hpcuser's job JOB_ID on NODE, with its run_dir in ``base``."""

    def __init__(self, base: Path, env: dict[str, str] | None = None):
        self.run_dir = base / "run"
        self.sock = self.run_dir / f"agent-{JOB_ID}.{NODE}.sock"
        self.pidfile = self.run_dir / f"agent-{JOB_ID}.{NODE}.pid"
        self.log = base / f"agent-{uuid.uuid4().hex[:8]}.log"
        argv = cli_argv("slurm", "agent", "--job-id", JOB_ID, "--uid", PW.pw_uid, "--node", NODE)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**cli_env(), "HPCCR_RUN_DIR": str(self.run_dir), **(env or {})},
            )

        def listening() -> bool:
            assert self.proc.poll() is None, self.log.read_text()
            return self.sock.exists() and self.pidfile.exists()

        wait_until(listening, "the agent's socket")
        assert self.pidfile.read_text().split() == [str(self.proc.pid)]

    def assert_gone(self, status: int) -> None:
        """The agent exited with ``status`` and left no socket and no pid file."""
        assert self.proc.wait(TIMEOUT) == status, self.log.read_text()
        assert not self.sock.exists() and not self.pidfile.exists(), list(self.run_dir.iterdir())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def agents(shared_dir):
    started: list[Agent] = []

    def start(env: dict[str, str] | None = None) -> Agent:
        started.append(Agent(shared_dir, env))
        return started[-1]

    yield start
    for agent in started:
        agent.kill()


@pytest.fixture
def cgroup():
    """A pids cgroup and a cgroup2 group of their own (name); whatever is left in them at the
    end is killed."""
    name = f"hpccr-test-{uuid.uuid4().hex[:8]}"
    dirs = [CGROUPS / "pids" / name, CGROUPS / "unified" / name]
    try:
        for d in dirs:
            d.mkdir()
    except OSError as exc:
        for d in dirs:
            if d.exists():
                d.rmdir()
        pytest.skip(f"cannot make cgroups here: {exc}")
    yield name
    for d in dirs:
        pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda d=d: not (d / "cgroup.procs").read_text().split(), f"{d} emptied", 10)
        d.rmdir()


@pytest.fixture
def home(shared_dir):
    """hpcuser's directory, where the counter, its log and its series are."""
    home = shared_dir / "home"
    home.mkdir()
    os.chown(home, PW.pw_uid, PW.pw_gid)
    return home


def user_process(argv: list[str], out: Path, err: Path, user=PW) -> subprocess.Popen:
    """``argv`` as ``user`` (all ids, groups of initgroups), stdout and stderr to files."""
    with open(out, "ab") as stdout, open(err, "ab") as stderr:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=os.getgrouplist(user.pw_name, user.pw_gid),
            cwd="/",
        )


def raw_request(agent: Agent, user: str, request: dict | None, nfds: int, tmp: Path,
                events: str = "seqpacket") -> dict:
    """The agent's reply to a bare client of ``user`` sending ``request`` (None: nothing), with
    ``events`` as its events descriptor: a unix seqpacket socket, or a unix stream socket, a
    UDP socket, a pipe, or a file of that path."""
    out, err = tmp / "raw.out", tmp / "raw.err"
    for f in (out, err):
        f.write_bytes(b"")
    argv = ["/usr/bin/python3", "-c", RAW_CLIENT, str(agent.sock)]
    argv += [json.dumps(request) if request is not None else "", str(nfds), events]
    proc = user_process(argv, out, err, pwd.getpwnam(user))
    assert proc.wait(TIMEOUT) == 0, err.read_text()
    return json.loads(out.read_text())


def job_request(op: str, home: Path, argv: list[str], stop_signals: list[int]) -> dict:
    return {
        "op": op,
        "dir": str(home / "series"),
        "interval": None,
        "keep": 2,
        "stop_signals": stop_signals,
        "argv": argv,
        "env": {"PATH": "/usr/bin:/bin"},
        "cwd": str(home),
    }


def serves_the_job_next(agent: Agent, home: Path, tmp: Path) -> None:
    """The agent is still there, and the next valid request of the job's user starts the job;
    then the agent is gone (it serves one session that starts the job)."""
    assert agent.proc.poll() is None and agent.sock.exists(), agent.log.read_text()
    request = job_request("run", home, ["/bin/true"], [])
    assert "started" in raw_request(agent, USER, request, PASSED_FDS, tmp)
    agent.assert_gone(0)


def test_agent_serves_its_user_only(agents, home, shared_dir, tmp_path):
    """A client of another user (nobody) gets an error and the agent waits on; so it does when
    the job's user connects and leaves without a request; the job's session then comes."""
    agent = agents()
    reply = raw_request(agent, "nobody", None, 0, tmp_path)
    assert reply == {"error": "this agent serves another user's job", "code": 11}
    assert agent.proc.poll() is None and agent.sock.exists()
    assert raw_request(agent, "nobody", None, 0, tmp_path)["code"] == 11  # again: still there
    out, err = shared_dir / "hpcuser.out", shared_dir / "hpcuser.err"
    bye = "import socket as s, sys; s.socket(s.AF_UNIX, s.SOCK_SEQPACKET).connect(sys.argv[1])"
    proc = user_process(["/usr/bin/python3", "-c", bye, str(agent.sock)], out, err)
    assert proc.wait(TIMEOUT) == 0, err.read_text()
    serves_the_job_next(agent, home, tmp_path)


class Clients:
    """hpcuser's batch steps (SESSION_CLIENT) in the test's cgroup, writing to ``out`` and
    ``err`` in hpcuser's ``home``, where the counter is too."""

    def __init__(self, user_python: str, home: Path, cgroup: str, binary: Path):
        self.python, self.home, self.cgroup = user_python, home, cgroup
        self.counter = home / "tree_counter"
        shutil.copy(binary, self.counter)
        self.counter.chmod(0o755)
        self.out, self.err = home / "job.out", home / "client.err"
        for f in (self.out, self.err):
            f.touch()
            os.chown(f, PW.pw_uid, PW.pw_gid)

    def start(self, agent: Agent, request: dict) -> tuple[subprocess.Popen, int]:
        """A client sending ``request``, and the pid the agent's answer gave."""
        before = len(self.errors())
        argv = [self.python, "-c", SESSION_CLIENT, str(agent.sock), json.dumps(request)]
        proc = user_process([*argv, self.cgroup], self.out, self.err)
        for hierarchy in ("pids", "unified"):
            (CGROUPS / hierarchy / self.cgroup / "cgroup.procs").write_text(f"{proc.pid}\n")

        def said() -> list[str]:
            assert proc.poll() is None, self.err.read_text()
            lines = self.errors()[before:]
            return [line for line in lines if line.startswith("client: started ")]

        wait_until(said, "the agent's answer")
        return proc, int(said()[-1].split()[-1])

    def run_request(self, steps: int, stop_signals: list[int]) -> dict:
        argv = [str(self.counter), str(steps), "20"]
        return job_request("run", self.home, argv, stop_signals)

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines()

    def errors(self) -> list[str]:
        return self.err.read_text().splitlines()

    def wait_count(self, n: int, pid: int) -> None:
        def reached() -> bool:
            assert pid_alive(pid), f"the job ended early:\n{self.out.read_text()}"
            return max(counts(self.lines()), default=-1) >= n

        wait_until(reached, f"COUNT {n}")


@pytest.fixture
def clients(user_python, home, cgroup, workload_binaries):
    return Clients(user_python, home, cgroup, workload_binaries["tree_counter"])


def test_agent_runs_and_restores_the_job(agents, clients, cgroup):
    """hpcuser's client asks to run the counter with SIGUSR1 as stop signal: the agent answers
    {"started": pid}; the job runs as hpcuser in the client's cgroups and writes to the client's
    stdout; SIGUSR1 to the client reaches the agent, which checkpoints the job into hpcuser's
    series and stops it: 75 comes back and the agent is gone.  A second agent restores the
    series for a second client: the job goes on from where it stopped to PASS."""
    steps = 150
    agent = agents()
    proc, pid = clients.start(agent, clients.run_request(steps, [signal.SIGUSR1]))
    clients.wait_count(10, pid)
    tree = tree_of(pid)
    assert len(tree) == 3, tree
    for task in tree:
        status = proc_status(task)
        assert status["Uid"].split() == [str(PW.pw_uid)] * 4, status["Uid"]
        theirs = Path(f"/proc/{task}/cgroup").read_text()
        assert theirs == Path(f"/proc/{proc.pid}/cgroup").read_text(), theirs
        assert f"pids:/{cgroup}\n" in theirs and f"0::/{cgroup}\n" in theirs, theirs
    wait_until(lambda: catches(proc.pid, signal.SIGUSR1), "the client's USR1 handler")
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(TIMEOUT) == STOPPED, clients.err.read_text()
    series = clients.home / "series"
    errors = clients.errors()
    assert f"hpccr: SIGUSR1: job checkpointed to {series}/ckpt-0001 and stopped" in errors
    assert errors[-1] == f"client: exit {STOPPED}", errors
    agent.assert_gone(0)
    wait_until(lambda: not pid_alive(pid), "the stopped job gone", 10)
    for path in [series, *series.rglob("*")]:
        assert path.lstat().st_uid == PW.pw_uid, path
    assert "PASS" not in clients.lines()

    agent = agents()
    proc, _ = clients.start(agent, job_request("restore", clients.home, [], []))
    assert proc.wait(TIMEOUT) == 0, clients.err.read_text()
    assert clients.errors()[-1] == "client: exit 0"
    agent.assert_gone(0)
    lines = clients.lines()
    assert counts(lines) == list(range(steps)), lines
    assert lines[-1] == "PASS" and lines.count("PASS") == 1, lines


def test_agent_passes_other_signals_on(agents, clients):
    """SIGUSR2, not a stop signal, sent to the client kills the job (its default action): the
    client gets 128+12 back, nothing was checkpointed, and the agent is gone."""
    agent = agents()
    proc, pid = clients.start(agent, clients.run_request(400, [signal.SIGUSR1]))
    clients.wait_count(5, pid)
    wait_until(lambda: catches(proc.pid, signal.SIGUSR2), "the client's USR2 handler")
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(TIMEOUT) == 128 + signal.SIGUSR2, clients.err.read_text()
    assert clients.errors()[-1] == f"client: exit {128 + signal.SIGUSR2}"
    agent.assert_gone(0)
    assert not pid_alive(pid)
    assert not (clients.home / "series" / "latest").exists()


def test_job_ends_with_its_client(agents, clients):
    """The batch step killed (SIGKILL, it says nothing): the agent ends the job and is gone."""
    agent = agents()
    proc, pid = clients.start(agent, clients.run_request(1000, [signal.SIGUSR1]))
    clients.wait_count(5, pid)
    proc.kill()
    proc.wait(TIMEOUT)
    agent.assert_gone(0)
    wait_until(lambda: not pid_alive(pid), "the job's end", 10)
    assert "PASS" not in clients.lines()


MALFORMED = {
    "op": ({"op": "exec"}, PASSED_FDS, "agent: bad request: 'op'"),
    "no fds": ({}, 0, "the request must come with stdin, stdout, stderr"),
    "stdio only": ({}, 3, "the request must come with stdin, stdout, stderr"),
    "stop signal": ({"stop_signals": [9]}, PASSED_FDS, "agent: bad request: 'stop_signals'"),
    "argv": ({"argv": []}, PASSED_FDS, "agent: bad request: 'argv'"),
    "keep": ({"keep": "2"}, PASSED_FDS, "agent: bad request: 'keep'"),
    "env": ({"env": {"A": 1}}, PASSED_FDS, "agent: bad request: 'env'"),
    # What `hpccr run` refuses as a usage error: an interval below 1 s, keep below 1.
    "interval": ({"interval": -1}, PASSED_FDS, "agent: bad request: 'interval'"),
    "keep 0": ({"keep": 0}, PASSED_FDS, "agent: bad request: 'keep'"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_agent_rejects_malformed_requests(agents, home, tmp_path, case):
    """A request of the right user that is malformed gets an error and starts no job; the
    agent stays for its job, whose valid request it then serves."""
    change, nfds, error = MALFORMED[case]
    marker = home / "ran"
    request = {**job_request("run", home, ["touch", str(marker)], []), **change}
    agent = agents()
    reply = raw_request(agent, USER, request, nfds, tmp_path)
    assert error in reply.get("error", "") and isinstance(reply.get("code"), int), reply
    assert not marker.exists()
    serves_the_job_next(agent, home, tmp_path)
    assert not agent.log.read_text(), agent.log.read_text()


@pytest.mark.parametrize("events", ["stream", "udp", "pipe", "/etc/hostname"])
def test_agent_refuses_an_events_descriptor_of_another_kind(agents, home, tmp_path, events):
    """A request whose events descriptor is not a unix seqpacket socket is refused with one
    line (before, a pipe or a file failed the agent's child with a traceback-like error); the
    agent stays for its job, whose valid request it then serves."""
    marker = home / "ran"
    agent = agents()
    reply = raw_request(agent, USER, job_request("run", home, ["touch", str(marker)], []),
                        PASSED_FDS, tmp_path, events)
    assert reply == {"error": "agent: the events descriptor must be a unix seqpacket socket",
                     "code": 1}, reply
    assert not marker.exists()
    serves_the_job_next(agent, home, tmp_path)
    assert not agent.log.read_text(), agent.log.read_text()


def slurm_job(agent: Agent, home: Path, cgroup: str, user_python: str):
    """`hpccr slurm job` of hpcuser (in `cgroup`, as in a job's) running a script that says
    "started" and sleeps: the client, and its stdout and stderr files."""
    script = home / "job.sh"
    script.write_text("#!/bin/sh\necho started\nexec sleep 60\n")
    script.chmod(0o755)
    out, err = home / "slurm-job.out", home / "slurm-job.err"
    env = {"PATH": "/usr/bin:/bin", "HPCCR_RUN_DIR": str(agent.run_dir),
           "HPCCR_CHECKPOINT_BASE": str(home / "checkpoints"), "SLURM_JOB_ID": JOB_ID,
           "SLURMD_NODENAME": NODE}
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        client = subprocess.Popen(
            [user_python, "-m", "hpccr", "slurm", "job", "--", str(script)],
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env, cwd=str(home),
            user=PW.pw_uid, group=PW.pw_gid, extra_groups=[])
    for hierarchy in ("pids", "unified"):  # the job joins them: the fixture kills what is left
        (CGROUPS / hierarchy / cgroup / "cgroup.procs").write_text(f"{client.pid}\n")
    return client, out, err


def test_agent_lost_after_the_start_never_starts_the_job_twice(
        agents, home, cgroup, user_python):
    """`hpccr slurm job` whose agent dies once the job runs: the run ends with status 1 and
    says why, and the script is not started a second time without checkpoints.  (The agent
    may die before its answer reached the batch step: the next test makes that sure.)"""
    agent = agents()
    client, out, err = slurm_job(agent, home, cgroup, user_python)
    wait_until(lambda: "started" in out.read_text(), "the job's start")
    agent.kill()
    assert client.wait(TIMEOUT) == 1, err.read_text()
    assert "the hpccr agent went away before" in err.read_text()
    assert out.read_text().splitlines() == ["started"]


def test_agent_lost_before_its_answer_never_starts_the_job_twice(
        agents, home, cgroup, user_python):
    """The agent dies (HPCCR_FAULT=answer) once the job has started but before its answer
    reaches `hpccr slurm job`, which cannot know whether the job started: it does not start
    the script itself (it did, and the job ran twice), ends with status 1 and says why."""
    agent = agents({"HPCCR_FAULT": "answer"})
    client, out, err = slurm_job(agent, home, cgroup, user_python)
    assert client.wait(TIMEOUT) == 1, err.read_text()
    assert "the hpccr agent went away before it answered" in err.read_text(), err.read_text()
    wait_until(lambda: "started" in out.read_text(), "the job's start under the lost agent")
    assert out.read_text().splitlines() == ["started"]
    assert not any("runs without checkpoints" in line for line in err.read_text().splitlines())


def test_agent_serves_only_a_process_of_its_job(agents, tmp_path):
    """Where Slurm keeps the job in cgroups of its own (job_<id>), a client of the right user
    that is not in them (another job, a login shell) is refused: its job would escape the
    job's limits.  (Clients inside are served: the lifecycle tests on the real cluster.)"""
    job_cgroup = CGROUPS / "pids" / "slurm_hpccrtest" / f"uid_{PW.pw_uid}" / f"job_{JOB_ID}"
    try:
        job_cgroup.mkdir(parents=True)
    except OSError as exc:
        pytest.skip(f"cannot make cgroups here: {exc}")
    try:
        agent = agents()
        request = job_request("run", tmp_path, ["/bin/true"], [])
        reply = raw_request(agent, USER, request, PASSED_FDS, tmp_path)
        assert reply == {"error": f"agent: the client is not a process of job {JOB_ID}",
                         "code": 1}
        assert agent.proc.poll() is None and agent.sock.exists()  # for its job's own client
    finally:
        for d in (job_cgroup, job_cgroup.parent, job_cgroup.parent.parent):
            d.rmdir()


def _mutated(rng: random.Random, request: dict) -> str:
    """`request` made wrong in a random way (or two), as text: a field with a value of another
    type or shape, a field missing, keys no request has, or text that is not a JSON object."""
    values = [None, True, -1, 0, 2**70, 1.5, "", "x" * 5000, "\udcff", [], [1, "a"], {},
              {"a": [{}]}, ["../../etc"], {"PATH": None}]
    changed = dict(request)
    for _ in range(rng.randint(1, 2)):
        how = rng.randrange(4)
        key = rng.choice(sorted(request))
        if how == 0:
            changed[key] = rng.choice(values)
        elif how == 1:
            changed.pop(key, None)
        elif how == 2:
            changed[rng.choice(["", "op ", "signal", "\u00e9"])] = rng.choice(values)
        else:
            return rng.choice([" ", "{", "[]", "null", "42", '"run"', "{\"op\": \"run\"",
                               json.dumps([request]), json.dumps(request)[:-1], "\u2603" * 300])
    return json.dumps(changed)


@pytest.mark.parametrize("seed", range(24))
def test_agent_survives_fuzzed_requests(agents, home, tmp_path, seed):
    """A request of the right user made wrong at random (seeded: reproducible) gets one answer
    — an error with a code, or a start if the change left it valid — with no traceback; after
    an error the agent is still there for its job, whose valid request it serves."""
    rng = random.Random(seed)
    marker = home / "ran"
    valid = job_request("run", home, ["/usr/bin/touch", str(marker)], [])
    text = _mutated(rng, valid)
    agent = agents()
    out, err = tmp_path / "raw.out", tmp_path / "raw.err"
    argv = ["/usr/bin/python3", "-c", RAW_CLIENT, str(agent.sock), text, str(PASSED_FDS)]
    client = user_process(argv, out, err)
    assert client.wait(TIMEOUT) == 0, err.read_text()
    reply = json.loads(out.read_text())
    assert set(reply) in ({"error", "code"}, {"started"}), (text, reply)
    if "error" in reply:
        assert isinstance(reply["code"], int), (text, reply)
        assert not marker.exists(), text
        serves_the_job_next(agent, home, tmp_path)
    else:
        agent.assert_gone(0)
    assert "Traceback" not in agent.log.read_text(), (text, agent.log.read_text())
