"""SPANK-style Python hooks: a site adds its own steps to a job's life without patching hpccr.

A hook is a function taking one dict.  It is registered for one event, either by an installed
package (an entry point in the group `hpccr.hooks` whose name is the event) or in the site
configuration (`[hooks] job_start = ["site.hooks:on_start"]`, see etc/hpccr.toml).  Events, in
the order a job meets them:

    job_start          the job is about to start (or to be restored): command, interval
    before_checkpoint  a checkpoint is about to be taken: path
    after_checkpoint   it was taken (or failed): path, ok, error
    before_restore     a checkpoint is about to be restored: path
    after_restore      it was restored (or failed): path, ok, error
    job_end            the job ended: exit_code

Every dict also holds event, job_id, node, user, restart_count and checkpoint_dir.  Hooks run in
the job's own process (as the job's user), synchronously, in registration order.  A hook that
cannot be loaded or that raises is reported on stderr and skipped: it never stops the job.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
import traceback
from collections.abc import Callable
from importlib.metadata import entry_points

from hpccr import config
from hpccr.config import HOOK_EVENTS, ConfigError

ENTRY_POINT_GROUP = "hpccr.hooks"


def _report(message: str) -> None:
    print(f"hpccr: hook {message}", file=sys.stderr, flush=True)


def _load(spec: str) -> Callable[[dict], object]:
    module, _, attr = spec.partition(":")
    target = importlib.import_module(module)
    for name in attr.split("."):
        target = getattr(target, name)
    if not callable(target):
        raise TypeError(f"{spec} is not callable")
    return target


def registered(event: str) -> list[tuple[str, Callable[[dict], object]]]:
    """(name, function) of every hook for `event` that can be loaded; the others are reported."""
    specs = [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == event]
    try:
        specs += config.load().hooks[event]
    except ConfigError as exc:
        _report(f"configuration unusable, site hooks skipped: {exc}")
    hooks = []
    for spec in specs:
        try:
            hooks.append((spec, _load(spec)))
        except Exception as exc:  # a site's module may fail in any way
            _report(f"{spec} ({event}) cannot be loaded: {type(exc).__name__}: {exc}")
    return hooks


def job_info(event: str, **info) -> dict:
    """The dict a hook receives: what every event has, then the event's own fields."""
    return {
        "event": event,
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
        "user": os.environ.get("SLURM_JOB_USER") or os.environ.get("USER"),
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        "checkpoint_dir": os.environ.get("HPCCR_CHECKPOINT_DIR"),
        **info,
    }


def run_hooks(event: str, **info) -> int:
    """Call every hook registered for `event`; returns how many failed (each is reported)."""
    if event not in HOOK_EVENTS:
        raise ValueError(f"unknown hook event {event!r}")
    failed = 0
    for name, hook in registered(event):
        try:
            hook(job_info(event, **info))
        except (Exception, SystemExit) as exc:
            failed += 1
            where = traceback.extract_tb(exc.__traceback__)[-1]
            _report(f"{name} ({event}) failed: {type(exc).__name__}: {exc} "
                    f"[{where.filename}:{where.lineno}]")
    return failed
