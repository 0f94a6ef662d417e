"""JSON messages over Unix sockets, and the checkpoint events hpccr sends on one.

Before and after each checkpoint of a supervised job (`before_checkpoint`, `after_checkpoint`)
and once a restored job runs (`restored`), hpccr can tell a listener — under Slurm,
`hpccr slurm job`, which runs the site's hooks as the job's user — on a socket it was handed
(`hpccr run/restore --events-fd`), and waits for the listener's answer, so that a
`before_checkpoint` hook runs before the job is frozen.  A listener that does not answer within
EVENT_TIMEOUT_S, or is gone, is skipped: it never holds the job up for longer.

One message per packet (SOCK_SEQPACKET), a JSON object, with descriptors attached if any.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket

from hpccr.errors import HpccrError

MAX_MESSAGE = 1 << 20
EVENT_TIMEOUT_S = 120


def send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    data = json.dumps(message).encode()
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def receive(sock: socket.socket, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    """One message (None at end of connection) and the descriptors that came with it."""
    fds = array.array("i")
    data, ancillary, _, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(max_fds * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    try:
        message = json.loads(data)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        for fd in fds:
            os.close(fd)
        raise HpccrError("malformed message")
    return message, list(fds)


class EventChannel:
    """hpccr's end: announce an event and wait (a while) for the listener's answer."""

    def __init__(self, fd: int):
        self.sock = socket.socket(fileno=fd)
        self.sock.settimeout(EVENT_TIMEOUT_S)
        self.open = True

    def __call__(self, event: str, **fields) -> None:
        if not self.open:
            return
        try:
            send(self.sock, {"event": event, **fields})
            if receive(self.sock)[0] is None:
                self.open = False
        except (OSError, HpccrError):  # gone, or too slow: go on without it
            self.open = False
            with contextlib.suppress(OSError):
                self.sock.close()


def answer_events(sock: socket.socket, handle) -> bool:
    """The listener's end, when `sock` is readable: handle(event, fields) one event and answer
    it; False once hpccr closed its end."""
    try:
        message, _ = receive(sock)
    except (OSError, HpccrError):
        return False
    if message is None:
        return False
    event = message.pop("event", None)
    if isinstance(event, str):
        handle(event, message)
    with contextlib.suppress(OSError):
        send(sock, {"done": True})
    return True
