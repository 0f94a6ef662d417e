"""The privileged side of a checkpointed Slurm job: one agent per job run, on its batch host.

Jobs run as ordinary users, but a job in a pid namespace of its own, restored with its exact
pids, needs root.  The prolog (root) starts `hpccr slurm agent` for the job; the job's
`hpccr slurm job` (the batch step, as the user) connects to the agent's socket and asks it to
run the job script, or to restore the job's newest checkpoint.  The agent then does for the
user what `hpccr run --user` and `hpccr restore --user` do (hpccr.user: the job runs as the
user, images are read and written with the user's file rights, a restore gives no more than
the user's credentials), in a child that first joins the batch step's cgroups, so that the job
stays inside its Slurm job; that child talks on the batch step's own stdin, stdout and stderr
(passed over the socket).  The batch step passes on the signals Slurm sends it, and gets the
job's exit status back.

Only the job's user can use an agent (SO_PEERCRED), for one session that starts or restores
the job; a refused request is answered and the agent listens on.  An agent whose job has not
started within IDLE_S seconds exits, and the epilog stops one that is left.

Messages are JSON, one per SOCK_SEQPACKET packet:
    batch step -> agent   {"op": "run"|"restore", "dir", "interval", "keep", "stop_signals",
                           "argv", "env", "cwd"} with its fds 0, 1, 2 and an events socket
                           (hpccr.events); later {"signal": N}
    agent -> batch step   {"started": PID} or {"error": MESSAGE, "code": N}; then {"exit": N}
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from hpccr import config, faults
from hpccr.engine.job import FORWARDED
from hpccr.errors import HpccrError
from hpccr.events import EventChannel, answer_events, receive, send
from hpccr.slurm import cgroup

IDLE_S = 120  # the batch step connects as it starts, right after the prolog
REQUEST_TIMEOUT_S = 30  # from the connection to the request: the agent never waits for ever
PASSED_FDS = 4  # stdin, stdout, stderr, and the socket for checkpoint events (hpccr.events)
UCRED = struct.Struct("3i")  # pid, uid, gid
EXIT_AGENT_FAILED = 1


def socket_path(run_dir: Path, job_id: str, node: str) -> Path:
    return run_dir / f"agent-{job_id}.{node}.sock"


def pid_path(run_dir: Path, job_id: str, node: str) -> Path:
    return run_dir / f"agent-{job_id}.{node}.pid"


# --- the agent (root) ------------------------------------------------------------------------


def _valid_request(req: dict) -> dict:
    """The request, checked field by field (it comes from the user)."""
    def need(key, kind, optional=False):
        value = req.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
            raise HpccrError(f"agent: bad request: '{key}'")
        return value

    if req.get("op") not in ("run", "restore"):
        raise HpccrError("agent: bad request: 'op'")
    checked = {"op": req["op"], "dir": need("dir", str), "interval": need("interval", int, True),
               "keep": need("keep", int), "stop_signals": need("stop_signals", list),
               "argv": need("argv", list), "env": need("env", dict), "cwd": need("cwd", str)}
    for key in ("interval", "keep"):
        if checked[key] is not None and checked[key] < 1:
            raise HpccrError(f"agent: bad request: '{key}' must be at least 1")
    if not all(isinstance(s, int) and s in (*FORWARDED, signal.SIGUSR1)
               for s in checked["stop_signals"]):
        raise HpccrError("agent: bad request: 'stop_signals'")
    if not all(isinstance(a, str) for a in checked["argv"]) or (
            checked["op"] == "run" and not checked["argv"]):
        raise HpccrError("agent: bad request: 'argv'")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in checked["env"].items()):
        raise HpccrError("agent: bad request: 'env'")
    return checked


def serve(run_dir: Path, job_id: str, node: str, uid: int) -> int:
    """Serve the job's user until one session has started or restored the job, and return
    when it is over; or return once IDLE_S seconds have passed without one.  A refused
    request (or a client that leaves without one) is answered and the agent listens on: its
    job's own session may still come."""
    from hpccr.user import User

    user = User.lookup(str(uid))
    run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    path, pidfile = socket_path(run_dir, job_id, node), pid_path(run_dir, job_id, node)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    deadline = time.monotonic() + IDLE_S
    try:
        listener.bind(str(path))
        path.chmod(0o666)  # anyone may connect; only the job's user is served
        listener.listen(4)
        written = pidfile.with_name(pidfile.name + ".new")  # whole or absent to its readers
        written.write_text(f"{os.getpid()}\n")
        os.replace(written, pidfile)
        while (conn := _accept_user(listener, uid, deadline)) is not None:
            with conn:
                child = _start(conn, user, job_id)
                if child is None:
                    continue
                listener.close()  # the job runs: nobody else is served
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                return _relay(conn, child)
        return 0
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        pidfile.unlink(missing_ok=True)


def _accept_user(listener: socket.socket, uid: int, deadline: float) -> socket.socket | None:
    """The next client of the job's user (others are answered and let go); None at the
    deadline."""
    while (left := deadline - time.monotonic()) > 0:
        listener.settimeout(left)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            return None
        _, peer_uid, _ = UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      UCRED.size))
        if peer_uid == uid:
            conn.settimeout(None)
            return conn
        with contextlib.suppress(OSError):
            send(conn, {"error": "this agent serves another user's job", "code": 11})
        conn.close()
    return None


def _start(conn: socket.socket, user, job_id: str) -> int | None:
    """One client's request: the child that runs or restores the job (its answer sent), or
    None if there was no valid request (the error sent)."""
    peer_pid, _, _ = UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  UCRED.size))
    message, fds = None, []
    try:
        conn.settimeout(REQUEST_TIMEOUT_S)
        try:
            message, fds = receive(conn, PASSED_FDS)
        except TimeoutError:
            raise HpccrError(f"agent: no request within {REQUEST_TIMEOUT_S} s") from None
        conn.settimeout(None)
        if message is None:
            return None  # it left without a request
        # Else the user could run a job outside this job's limits (another job's, none).
        if cgroup.job_has_cgroups(job_id) and not cgroup.in_job(peer_pid, job_id):
            raise HpccrError(f"agent: the client is not a process of job {job_id}")
        if len(fds) != PASSED_FDS:
            raise HpccrError("agent: the request must come with stdin, stdout, stderr and an "
                             "events socket")
        _check_events_socket(fds[3])
        request = _valid_request(message)
    except (HpccrError, OSError) as exc:
        code = exc.exit_code if isinstance(exc, HpccrError) else EXIT_AGENT_FAILED
        with contextlib.suppress(OSError):
            send(conn, {"error": str(exc), "code": code})
        for fd in fds:
            os.close(fd)
        return None
    report_rd, report_wr = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:
        os.close(report_rd)
        conn.close()
        _supervise(request, fds, peer_pid, user, report_wr)  # never returns
    os.close(report_wr)
    for fd in fds:
        os.close(fd)
    with os.fdopen(report_rd, "rb") as report:
        started = json.loads(report.read() or b'{"error": "agent: the job did not start"}')
    faults.point("answer")
    with contextlib.suppress(OSError):  # the client may be gone: the relay sees it
        send(conn, started)
    return child


def _check_events_socket(fd: int) -> None:
    """Refuse a request whose events descriptor is not what hpccr.events talks over: a unix
    seqpacket socket (a pipe, a file or a stream socket would fail the job at its first
    checkpoint, or mix up its events)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        kind = None
    else:
        kind = (sock.family, sock.type)
        sock.detach()
    if kind != (socket.AF_UNIX, socket.SOCK_SEQPACKET):
        raise HpccrError("agent: the events descriptor must be a unix seqpacket socket")


def _relay(conn: socket.socket, child: int) -> int:
    """Pass the batch step's signals on to the child until it exits; report its status."""
    pidfd = os.pidfd_open(child)
    watched = [pidfd, conn]
    try:
        while True:
            ready, _, _ = select.select(watched, [], [])
            if pidfd in ready:
                code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
                with contextlib.suppress(OSError):
                    send(conn, {"exit": 128 - code if code < 0 else code})
                return 0
            try:
                message, _ = receive(conn)
            except (HpccrError, OSError):
                message = None
            if message is None:  # the batch step is gone: the job goes too
                os.kill(child, signal.SIGTERM)
                watched = [pidfd]
                continue
            signo = message.get("signal")
            if isinstance(signo, int) and signo in (*FORWARDED, signal.SIGUSR1):
                os.kill(child, signo)
    finally:
        os.close(pidfd)


def _supervise(request: dict, fds: list[int], peer_pid: int, user, report_wr: int) -> None:
    """In the agent's child: join the batch step's cgroups, take its stdio, start or restore
    the job for the user and be its parent until it ends; exits with its status."""
    from hpccr.engine.restore import restore_tree
    from hpccr.image.series import Series, resolve
    from hpccr.run import Checkpoints, Supervision, job_part, new_network, start_job

    try:
        for i, fd in enumerate(fds[:3]):
            os.dup2(fd, i)
            os.close(fd)
        os.set_inheritable(fds[3], False)
        try:
            cgroup.join(peer_pid)
        except OSError as exc:
            raise HpccrError(f"cannot join the job's cgroups: {exc}") from exc
        user.take_fs_rights()
        part = job_part(request["env"])
        checkpoints = Checkpoints(Series(request["dir"]), request["interval"], request["keep"],
                                  tuple(request["stop_signals"]), EventChannel(fds[3]), part)
        supervision = Supervision(checkpoints)
        if request["op"] == "run":
            network = new_network(request["env"].get("HPCCR_JOB_NETWORK"), request["env"])
            pid = start_job(request["argv"], user, request["env"], request["cwd"], network)
        else:
            pid, network = restore_tree(request["dir"], user, config.load().tcp_close, part)
        os.write(report_wr, json.dumps({"started": pid}).encode())
        os.close(report_wr)
        report_wr = -1
        if request["op"] == "restore":  # answered once the batch step knows it started
            checkpoints.notify("restored",
                               path=str(resolve(request["dir"], part.slot if part else None)))
        status = supervision.run(pid, network)
    except HpccrError as exc:
        if report_wr >= 0:
            os.write(report_wr, json.dumps({"error": str(exc), "code": exc.exit_code}).encode())
        else:
            print(f"hpccr: error: {exc}", file=sys.stderr, flush=True)
        os._exit(exc.exit_code)
    except BaseException as exc:  # a bug: say it where the user sees it, never hang the job
        with contextlib.suppress(OSError):
            os.write(report_wr, json.dumps({"error": f"agent: {exc!r}", "code": 1}).encode())
        print(f"hpccr: agent failed: {exc!r}", file=sys.stderr, flush=True)
        os._exit(EXIT_AGENT_FAILED)
    os._exit(status)


# --- the batch step's side (the user) --------------------------------------------------------


class AgentLost(HpccrError):
    """The agent took the request and went away before it answered: whether it started the
    job is not known, so the batch step must not start it itself."""


class AgentSession:
    """The batch step's end: one request, signals passed on, checkpoint events answered with
    `on_event(event, fields)`, the exit status back."""

    def __init__(self, path: Path, request: dict, on_event):
        self.on_event = on_event
        self.events, far_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(str(path))
            send(self.sock, request, [0, 1, 2, far_end.fileno()])
            reply, _ = receive(self.sock)
        except OSError as exc:
            self.close()
            raise HpccrError(f"cannot use the hpccr agent at {path}: {exc.strerror or exc}") \
                from exc
        finally:
            far_end.close()
        if reply is None:
            self.close()
            raise AgentLost("the hpccr agent went away before it answered; the job may have "
                            "started under it, so it is not started again here")
        if "started" not in reply:
            self.close()
            raise HpccrError(str(reply.get("error", "no answer")))
        self.pid = reply["started"]
        self.previous = {sig: signal.signal(sig, self._forward)
                         for sig in {*FORWARDED, *request["stop_signals"]}}

    def _forward(self, signo: int, _frame) -> None:
        with contextlib.suppress(OSError):
            send(self.sock, {"signal": signo})

    def close(self) -> None:
        self.sock.close()
        self.events.close()

    def wait(self, parts=None) -> int:
        """The job's exit status; the job gets SIGTERM if it loses `parts` (the batch step's
        OtherParts)."""
        watched = [self.sock, self.events, *([parts] if parts else [])]
        try:
            while True:
                ready, _, _ = select.select(watched, [], [])
                if parts in ready:
                    watched.remove(parts)
                    if parts.lost():
                        self._forward(signal.SIGTERM, None)
                if self.events in ready and not answer_events(self.events, self.on_event):
                    watched.remove(self.events)
                if self.sock not in ready:
                    continue
                message, _ = receive(self.sock)
                if message is None:
                    raise HpccrError("the hpccr agent went away before the job ended")
                if isinstance(message.get("exit"), int):
                    return message["exit"]
        finally:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            self.close()
