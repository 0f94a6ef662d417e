"""hpccr errors and the exit codes the CLI maps them to.

Every error a user can cause or meet carries one clear message and one exit code; the CLI prints
``hpccr: error: <message>`` and exits with ``exit_code``.  The table is documented in README.md.
"""

from __future__ import annotations

import contextlib
import errno
import os


class HpccrError(Exception):
    """Base class: a failure with a one-line message meant for a person."""

    exit_code = 1


class NoSuchProcess(HpccrError):
    exit_code = 10


class AccessDenied(HpccrError):
    exit_code = 11


class ImageNotFound(HpccrError):
    exit_code = 12


class ImageCorrupt(HpccrError):
    """Missing, truncated or altered file, bad checksum, unknown format version."""

    exit_code = 13


class UnsupportedResource(HpccrError):
    """The target holds kernel state hpccr cannot checkpoint yet."""

    exit_code = 14


class PidInUse(HpccrError):
    exit_code = 15


class IncompatibleMachine(HpccrError):
    """CPU features, kernel layout or privileges here cannot host the image."""

    exit_code = 16


class FileMismatch(HpccrError):
    """A file the image refers to is missing or changed since the checkpoint."""

    exit_code = 17


class DumpFailed(HpccrError):
    exit_code = 18


class RestoreFailed(HpccrError):
    exit_code = 19


class ImageWriteError(HpccrError):
    """The image could not be written (disk full, permissions); the previous one is intact."""

    exit_code = 20


class CheckFailed(HpccrError):
    exit_code = 21


class Busy(HpccrError):
    """Another process has it: the target is traced (a debugger, another hpccr's dump), or the
    series is being checkpointed into or restored from by another hpccr."""

    exit_code = 22


def from_report(report: str) -> tuple[HpccrError | None, str]:
    """What another process of hpccr's reported as "<error class>\t<message>" (the first line):
    that error, or None if it names no error class of hpccr's; and the message."""
    kind, _, message = (report.splitlines() or [""])[0].partition("\t")
    error = globals().get(kind)
    if isinstance(error, type) and issubclass(error, HpccrError):
        return error(message), message
    return None, message


def from_oserror(exc: OSError, what: str, other: type[HpccrError]) -> HpccrError:
    """Translate an OSError met while doing ``what`` into the matching hpccr error: ``other``
    (DumpFailed, RestoreFailed, ImageCorrupt...) for any errno without a class of its own, so
    that no failure ends with an exit code the README does not list."""
    reason = exc.strerror or str(exc)
    if exc.filename is not None:
        reason = f"{exc.filename}: {reason}"
    if exc.errno == errno.ESRCH:
        return NoSuchProcess(f"{what}: no such process")
    if exc.errno in (errno.EPERM, errno.EACCES):
        return AccessDenied(f"{what}: {reason}")
    return other(f"{what}: {reason}")


# A MemoryError (Python could not allocate) met in a step of a dump or restore, in its words.
OWN_MEMORY = "hpccr's own memory ran out (its address space or memory limit)"


@contextlib.contextmanager
def starting_threads(what: str):
    """CPython reports a failed pthread_create (no address space for a stack, a limit on
    processes) only as RuntimeError("can't start new thread"); inside this block it is the
    OSError it is (EAGAIN), which callers report like any other resource that ran out."""
    try:
        yield
    except RuntimeError as exc:
        if str(exc) != "can't start new thread":
            raise
        raise OSError(errno.EAGAIN, f"starting {what}: {os.strerror(errno.EAGAIN)}") from None
