"""Unix domain sockets between processes of the dumped tree: socketpairs (stream, seqpacket,
dgram) with messages queued both ways, a listening socket with accepted and waiting
connections, an epoll server with three clients, sockets neither connected nor listening; each
dumped by its root pid and run as a job, and dumped with --leave-running (the original still
passes: nothing was consumed).  A pair of a process run as another user keeps its peer
credentials.  A socket connected to a process outside the dump, and data on a connection not
accepted yet, are refused.

Workloads: workloads/sock_pair.c stream|seqpacket|dgram, sock_listen.c DIR, sock_epoll.c,
sock_dgram_sources.c (datagrams sent to a bound socket by a named and an unnamed socket),
sock_unconnected.c DIR (sockets of each type never bound, or bound and neither listening nor
connected), sock_gone.c DIR (sockets whose name leads elsewhere or nowhere: its directory
removed, its file unlinked after bind and connect, a newer socket bound to it).
Each checks the exact queued messages, names, options and connections after the window.
"""

import os
import socket
from pathlib import Path

import pytest

PAIRS = ["stream", "seqpacket", "dgram"]


@pytest.fixture(params=["pid", "job"])
def mode(request) -> str:
    """`pid`: the tree is dumped by its root pid; `job`: it runs under `hpccr run`."""
    return request.param


def start(cr, mode: str, name: str, *args):
    command = [cr.binaries[name], *args]
    if mode == "job":
        return cr.start_job(command)
    return cr.start(Path(command[0]), *command[1:], append=True)


def workloads(tmp_path: Path) -> list[tuple[str, list]]:
    return [*(("sock_pair", [kind]) for kind in PAIRS), ("sock_listen", [tmp_path]),
            ("sock_epoll", []), ("sock_dgram_sources", []), ("sock_unconnected", [tmp_path]),
            ("sock_gone", [tmp_path])]


IDS = [*PAIRS, "listen", "epoll", "dgram-sources", "unconnected", "gone"]


@pytest.mark.parametrize("which", range(len(IDS)), ids=IDS)
def test_without_checkpoint(tree_cr, tmp_path, which):
    name, args = workloads(tmp_path)[which]
    workload = start(tree_cr, "pid", name, *args)
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


@pytest.mark.parametrize("which", range(len(IDS)), ids=IDS)
def test_checkpoint_restart(tree_cr, tmp_path, mode, which):
    name, args = workloads(tmp_path)[which]
    workload = start(tree_cr, mode, name, *args)
    tree_cr.checkpoint_restart(workload, tmp_path / "img")


@pytest.mark.parametrize("which", range(len(IDS)), ids=IDS)
def test_leave_running(tree_cr, tmp_path, which):
    """The original runs on and passes; then the image restores and passes too."""
    name, args = workloads(tmp_path)[which]
    workload = start(tree_cr, "pid", name, *args)
    tree_cr.leave_running_then_restore(workload, tmp_path / "img")


def test_peer_outside_the_dump_is_refused(cr, tmp_path):
    """stdin is a unix socket whose other end this test holds: refused (14), naming the
    descriptor and the process holding the peer; the workload runs on untouched."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        workload = cr.start("fd_eventfd", stdin=theirs.fileno())
        message = cr.assert_error(cr.dump(workload, tmp_path / "img"), 14)
        assert "fd 0 " in message and "unix socket" in message, message
        assert "outside what is dumped" in message, message
        assert f"process {os.getpid()} " in message, message
        assert not (tmp_path / "img").exists()
        workload.assert_untouched()
        assert workload.wait_exit() == 0, workload.output()
        workload.assert_passed()


def test_image_holds_the_queues(tree_cr, tmp_path):
    """Each direction of the stream pair is one data file with exactly the bytes sent."""
    workload = start(tree_cr, "pid", "sock_pair", "stream")
    img = tmp_path / "img"
    tree_cr.dump_and_kill(workload, img)
    assert len(list(img.glob("unix-*.img"))) == 2
    tree_cr.restore_and_pass(workload, img)


def test_data_on_a_waiting_connection_is_refused(tree_cr, tmp_path):
    """A client sent data on a connection still in the accept queue: only accepting it could
    read that data, so the dump refuses (14) naming it; the tree runs on and passes."""
    workload = start(tree_cr, "pid", "sock_listen", tmp_path, "early")
    message = tree_cr.assert_error(tree_cr.dump(workload, tmp_path / "img"), 14)
    assert "unix socket" in message and "accept queue" in message, message
    clients = tree_cr.trees[workload.pid][1:]
    assert any(f"process {pid} fd " in message for pid in clients), message
    assert not (tmp_path / "img").exists()
    workload.assert_untouched()
    assert workload.wait_exit() == 0, workload.output()
    workload.assert_passed()


def test_peer_credentials_of_a_user(tree_cr, tmp_path):
    """The pair of a process run as nobody: after the restore its peer credentials (checked by
    the workload) are nobody's again, not those of the restorer (root)."""
    setpriv = ["--reuid=65534", "--regid=65534", "--clear-groups"]
    workload = tree_cr.start(Path("/usr/bin/setpriv"), *setpriv, tree_cr.binaries["sock_pair"],
                             "stream", append=True)
    assert workload.status()["Uid"].split()[1] == "65534"
    tree_cr.checkpoint_restart(workload, tmp_path / "img")
