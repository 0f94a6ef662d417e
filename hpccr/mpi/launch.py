"""Remote daemons of MPI launchers started inside the job, on the job's other nodes.

mpirun (Open MPI) and mpiexec (MPICH's hydra) start their daemons on other nodes with ssh or
srun: processes outside the job, which no checkpoint reaches.  In a job on several nodes,
hpccr has them call `hpccr-launch HOST COMMAND…` instead, as they would call ssh: it asks the
launch server of the job's part at HOST (its host name in the job's overlay) to run COMMAND
there, through `/bin/sh -c`, as ssh would.  The command's output comes back on the agent's
stdout and stderr, its exit status is the agent's (255 if the server cannot be reached or the
connection breaks, as ssh's); its stdin is /dev/null.  The parts of a job start on their nodes
at about the same time, so an agent waits up to CONNECT_WAIT_S for a server not listening yet.
HOST may also be the Slurm name of one of the job's nodes (hydra's Slurm resource manager
names the allocation's nodes so): that node's part is meant (HPCCR_SLURM_NODES and
HPCCR_JOB_HOSTS, both by slot), and where that is the agent's own part the command runs right
there, as ssh to the same host would.

The launch server (`hpccr-launch --serve`) is the process that a part on a node other than the
first runs; it listens on PORT in the job's network, and the commands it runs are its children.
Agent, server and commands are all processes of the job, their connections TCP connections of
the job: a checkpoint takes them with the rest, and they go on after a restore on other nodes.

On the wire, the agent sends one JSON line ({"command": text, "cwd": path}); the server answers
with frames: one byte (STDOUT, STDERR or EXIT), a 4-byte big-endian length, the data (for
EXIT, the status as text).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

PORT = 7099
STDOUT, STDERR, EXIT = b"1", b"2", b"x"
HEADER = struct.Struct(">cI")
UNREACHABLE = 255  # ssh's status when it cannot run the command
CHUNK = 65536
CONNECT_WAIT_S = 120
CONNECT_RETRY_S = 0.2  # a server being started on another node cannot tell us when it listens


SLURM_NODES = "HPCCR_SLURM_NODES"  # the job's nodes by slot (Slurm's names), for its parts
JOB_HOSTS = "HPCCR_JOB_HOSTS"  # the host names of the job's parts, by slot


def executable() -> str:
    """This installation's hpccr-launch (a console script beside its Python)."""
    return str(Path(sys.executable).with_name("hpccr-launch"))


SSH_OPTIONS_WITH_VALUE = {"-l", "-p", "-o", "-i", "-F"}  # hydra passes -x, as to ssh


def main() -> None:
    args = sys.argv[1:]
    if args == ["--serve"]:
        serve()
    while args and args[0].startswith("-"):  # ssh's options, which mean nothing here
        args = args[2:] if args[0] in SSH_OPTIONS_WITH_VALUE else args[1:]
    if len(args) < 2:
        print("usage: hpccr-launch HOST COMMAND... | hpccr-launch --serve", file=sys.stderr)
        sys.exit(2)
    host, command = part_host(args[0]), " ".join(args[1:])
    sys.exit(run_here(command) if host == socket.gethostname() else launch(host, command))


def part_host(host: str) -> str:
    """The host name of the job's part that `host` means: a Slurm node name of the job is the
    part at that node's slot; any other name stays as it is."""
    names = os.environ.get(SLURM_NODES, "").split(",")
    hosts = os.environ.get(JOB_HOSTS, "").split(",")
    return hosts[names.index(host)] if host in names and len(names) == len(hosts) else host


def run_here(command: str) -> int:
    """Run `command` in this part, as the launch server would; its exit status."""
    status = subprocess.run(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL).returncode
    return status if status >= 0 else 128 - status


def launch(host: str, command: str) -> int:
    """Run `command` on the part at `host`; returns its exit status."""
    deadline = time.monotonic() + CONNECT_WAIT_S
    while True:
        try:
            conn = socket.create_connection((host, PORT))
            break
        except OSError as exc:
            if isinstance(exc, socket.gaierror) or time.monotonic() > deadline:
                print(f"hpccr-launch: cannot reach the launch server of {host}: "
                      f"{exc.strerror or exc}", file=sys.stderr)
                return UNREACHABLE
            time.sleep(CONNECT_RETRY_S)
    with conn, conn.makefile("rb") as frames:
        try:
            conn.sendall(json.dumps({"command": command, "cwd": os.getcwd()}).encode() + b"\n")
            outputs = {STDOUT: sys.stdout.buffer, STDERR: sys.stderr.buffer}
            while header := frames.read(HEADER.size):
                if len(header) < HEADER.size:
                    break
                kind, length = HEADER.unpack(header)
                data = frames.read(length)
                if kind == EXIT:
                    return int(data)
                if kind in outputs:
                    outputs[kind].write(data)
                    outputs[kind].flush()
        except OSError as exc:
            print(f"hpccr-launch: the connection to {host} broke before the command ended: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return UNREACHABLE
    print(f"hpccr-launch: the connection to {host} ended before the command did",
          file=sys.stderr)
    return UNREACHABLE


def serve() -> None:
    """Accept agents until SIGHUP (the job's script has ended: hpccr.slurm.job) or SIGTERM,
    which end the server with status 0; each agent is served by a child of its own."""
    signal.signal(signal.SIGCHLD, lambda *_: _reap())
    for ending in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(ending, lambda *_: sys.exit(0))
    listener = socket.create_server(("0.0.0.0", PORT))
    print("READY", flush=True)
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                _run_for(conn)
            finally:
                os._exit(0)
        conn.close()


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def _run_for(conn: socket.socket) -> None:
    """Run the command one agent asks for, sending its output and exit status back."""
    with conn:
        with conn.makefile("rb") as request:
            asked = json.loads(request.readline())
        cwd = asked["cwd"] if os.path.isdir(asked["cwd"]) else None
        child = subprocess.Popen(["/bin/sh", "-c", asked["command"]], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
        streams = selectors.DefaultSelector()
        streams.register(child.stdout, selectors.EVENT_READ, STDOUT)
        streams.register(child.stderr, selectors.EVENT_READ, STDERR)
        while streams.get_map():
            for key, _ in streams.select():
                data = os.read(key.fileobj.fileno(), CHUNK)
                if not data:
                    streams.unregister(key.fileobj)
                    continue
                conn.sendall(HEADER.pack(key.data, len(data)) + data)
        status = child.wait()
        status = status if status >= 0 else 128 - status  # killed by a signal, as a shell says
        conn.sendall(HEADER.pack(EXIT, len(str(status))) + str(status).encode())
