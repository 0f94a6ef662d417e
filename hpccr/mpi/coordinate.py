"""Coordinated checkpoints of a job on several nodes: all its parts frozen, dumped and committed
together, or none.

Each part has its supervisor (`hpccr run` or `hpccr restore` on its node).  The one of slot 0
coordinates; the others are members.  A member listens on its node's address and writes where
(address, port) and a secret token into the series directory, `.parts/<slot>` (readable by the
job's user only; the series is on the shared file system).  A checkpoint of the series
`ckpt-NNNN` is one image per part, `ckpt-NNNN/part-<slot>`, and runs as one transaction:

1. The coordinator connects to every member and asks for the checkpoint (path, mode), then
   dumps its own part; every part freezes its processes and locks their connections.
2. Once every part is frozen, the coordinator says "go": no part runs again before all are
   frozen, so no message can be received in one image that the other's image has not sent
   (what a frozen part sends later stays unacknowledged in its send queue, and is in its image).
3. Each part writes its image and says "complete"; once all are, the coordinator moves `latest`
   to the checkpoint and says "commit": each part then does what the mode says (thaws, or is
   killed).

The coordinator writes what it measured into the checkpoint, `coordination.json` (also in the
`after_checkpoint` event): the freeze skew (from the first part frozen to the last, by each
node's clock), how long the parts waited for each other frozen, and the time to the commit.

Any failure, timeout or lost connection before the commit aborts it: every part thaws and runs
on as before, the checkpoint's directory is removed and `latest` stays where it was.  A member
that loses the coordinator after its image is complete looks at `latest` (the shared file
system holds the decision): committed if it names this checkpoint, aborted otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path

from hpccr import faults
from hpccr.engine.dump import Barrier, dump
from hpccr.errors import DumpFailed, HpccrError
from hpccr.image.series import PART, Series

PARTS = ".parts"
FIGURES = "coordination.json"
FROZEN_TIMEOUT = 120.0  # seconds for every part to be frozen
COMPLETE_TIMEOUT = 3600.0  # for every part's image to be written
ANSWER_TIMEOUT = 60.0  # for a member to answer a connection


def part_image(checkpoint: Path, slot: int) -> Path:
    return checkpoint / f"{PART}{slot}"


class Channel:
    """One JSON message per line, both ways, over a TCP connection, each wait bounded."""

    def __init__(self, conn: socket.socket, peer: str):
        self.conn, self.peer = conn, peer
        self.lines = conn.makefile("rb")

    def send(self, **message) -> None:
        self.conn.sendall(json.dumps(message).encode() + b"\n")

    def receive(self, timeout: float) -> dict:
        self.conn.settimeout(timeout)
        try:
            line = self.lines.readline()
        except TimeoutError:
            raise DumpFailed(f"{self.peer} did not answer within {timeout:.0f} s") from None
        except OSError as exc:
            raise DumpFailed(f"lost {self.peer}: {exc.strerror or exc}") from None
        if not line:
            raise DumpFailed(f"lost {self.peer} (its hpccr ended)")
        return json.loads(line)

    def expect(self, what: str, timeout: float) -> dict:
        message = self.receive(timeout)
        if "error" in message:
            raise DumpFailed(f"{self.peer}: {message['error']}")
        if message.get("state") != what:
            raise DumpFailed(f"{self.peer} said {message} instead of {what}")
        return message

    def close(self) -> None:
        self.lines.close()
        self.conn.close()


class Member:
    """The supervisor of a part other than slot 0: it waits for the coordinator's requests."""

    def __init__(self, series: Series, slot: int, address: str):
        self.series, self.slot = series, slot
        self.listener = socket.create_server((address, 0))
        self.token = secrets.token_hex(16)
        where = series.dir / PARTS
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = where / f".{slot}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            port = self.listener.getsockname()[1]
            json.dump({"address": address, "port": port, "token": self.token}, f)
        os.replace(tmp, where / str(slot))

    def fileno(self) -> int:
        return self.listener.fileno()

    def serve(self, pid: int, notify) -> str | None:
        """Take the checkpoint the coordinator asks for; returns its mode once committed, or
        None (refused, failed or aborted: the part runs on)."""
        conn, _ = self.listener.accept()
        channel = Channel(conn, "the coordinator")
        try:
            asked = channel.receive(ANSWER_TIMEOUT)
            if not secrets.compare_digest(str(asked.get("token")), self.token):
                return None  # not the job's coordinator
            path = Path(asked["path"])
            notify("before_checkpoint", path=str(path))
            try:
                dump(pid, str(path), asked["mode"], _MemberBarrier(channel, self.series, path))
            except HpccrError as exc:
                with contextlib.suppress(OSError):
                    channel.send(error=str(exc))
                notify("after_checkpoint", path=str(path), ok=False, error=str(exc))
                return None
            notify("after_checkpoint", path=str(path), ok=True, error=None)
            return asked["mode"]
        except (DumpFailed, OSError, ValueError, KeyError):
            return None
        finally:
            channel.close()

    def close(self) -> None:
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.series.dir / PARTS / str(self.slot))


class _MemberBarrier(Barrier):
    def __init__(self, channel: Channel, series: Series, path: Path):
        self.channel, self.series, self.checkpoint = channel, series, path.parent

    def frozen(self) -> None:
        self.channel.send(state="frozen", at=time.time())
        faults.point("part-frozen")
        self.channel.expect("go", FROZEN_TIMEOUT)

    def complete(self) -> None:
        self.channel.send(state="complete")
        try:
            self.channel.expect("commit", COMPLETE_TIMEOUT)
        except DumpFailed:
            if self.series.latest() != self.checkpoint:
                raise


def take(series: Series, checkpoint: Path, slots: int, pid: int, mode: str,
         keep: int) -> dict:
    """The checkpoint `checkpoint` of every part of the job (slots 1.. by their members, slot
    0, process `pid`, here), published as `latest` once all are complete; on failure nothing is
    left of it and the job runs on (HpccrError says why).  Returns what coordination.json
    holds."""
    checkpoint.mkdir()
    channels: list[Channel] = []
    barrier = _CoordinatorBarrier(channels, series, checkpoint, keep)
    try:
        for slot in range(1, slots):
            channel, token = _connect(series, slot)
            channels.append(channel)
            channel.send(token=token, path=str(part_image(checkpoint, slot)), mode=mode)
        dump(pid, str(part_image(checkpoint, 0)), mode, barrier)
        return barrier.figures
    finally:
        for channel in channels:
            if not barrier.published:
                with contextlib.suppress(OSError):
                    channel.send(state="abort")
            channel.close()
        if not barrier.published:
            shutil.rmtree(checkpoint, ignore_errors=True)


def _connect(series: Series, slot: int) -> tuple[Channel, str]:
    """A channel to the member of `slot`, and the token it wants."""
    try:
        where = json.loads((series.dir / PARTS / str(slot)).read_text())
        address, port, token = str(where["address"]), int(where["port"]), str(where["token"])
    except (OSError, ValueError, KeyError, TypeError):
        raise DumpFailed(f"part {slot} of the job has no supervisor that takes checkpoints "
                         f"({series.dir / PARTS / str(slot)})") from None
    try:
        conn = socket.create_connection((address, port), ANSWER_TIMEOUT)
    except OSError as exc:
        raise DumpFailed(f"cannot reach the supervisor of part {slot} at {address}: "
                         f"{exc.strerror or exc}") from None
    return Channel(conn, f"part {slot}"), token


class _CoordinatorBarrier(Barrier):
    def __init__(self, channels: list[Channel], series: Series, checkpoint: Path, keep: int):
        self.channels, self.series, self.checkpoint, self.keep = channels, series, checkpoint, keep
        self.published = False
        self.started = time.monotonic()
        self.figures: dict = {}

    def frozen(self) -> None:
        frozen_at, waiting = [time.time()], time.monotonic()
        for channel in self.channels:
            frozen_at.append(float(channel.expect("frozen", FROZEN_TIMEOUT).get("at", 0)))
        for channel in self.channels:
            channel.send(state="go")
        self.figures |= {"parts": len(frozen_at),
                         "freeze_skew_s": round(max(frozen_at) - min(frozen_at), 6),
                         "frozen_wait_s": round(time.monotonic() - waiting, 6)}

    def complete(self) -> None:
        for channel in self.channels:
            channel.expect("complete", COMPLETE_TIMEOUT)
        self.figures["commit_s"] = round(time.monotonic() - self.started, 6)
        with open(self.checkpoint / FIGURES, "w") as f:
            json.dump(self.figures, f)
            f.flush()
            os.fsync(f.fileno())
        self.series.publish(self.checkpoint, self.keep)
        self.published = True
        for channel in self.channels:
            with contextlib.suppress(OSError):  # it reads the decision in `latest`
                channel.send(state="commit")
