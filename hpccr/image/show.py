"""``hpccr show``: describe an image for a person (or as JSON) without touching any process.

Checksum problems are reported, not raised: show is how one inspects a damaged image.  Only an
unreadable ``image.json`` is an error.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shlex
import signal
from collections import Counter
from pathlib import Path

from hpccr.engine.memory import ADVICE_NAMES
from hpccr.image.chain import forked_pages, links
from hpccr.image.series import PART
from hpccr.image.store import PAGE_SIZE, ImageReader
from hpccr.mpi.coordinate import FIGURES

NOT_IN_SYSCALL = (1 << 64) - 1

# The blocking system calls a checkpointed thread is usually found in (x86-64 numbers).
_SYSCALLS = {
    0: "read", 1: "write", 7: "poll", 23: "select", 34: "pause", 35: "nanosleep", 61: "wait4",
    202: "futex", 230: "clock_nanosleep", 232: "epoll_wait", 270: "pselect6", 271: "ppoll",
    281: "epoll_pwait", 441: "epoll_pwait2",
}

_ACCESS_MODES = {os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}
_OPEN_FLAGS = [
    ("O_APPEND", os.O_APPEND), ("O_NONBLOCK", os.O_NONBLOCK), ("O_SYNC", os.O_SYNC),
    ("O_DSYNC", os.O_DSYNC), ("O_DIRECT", os.O_DIRECT), ("O_NOATIME", os.O_NOATIME),
    ("O_PATH", os.O_PATH),
]


def human_size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def open_flags(flags: int) -> str:
    names = [_ACCESS_MODES.get(flags & 3, f"accmode {flags & 3}")]
    for name, bit in _OPEN_FLAGS:
        # O_SYNC includes the O_DSYNC bit; name only the stronger one.
        if flags & bit == bit and not (name == "O_DSYNC" and flags & os.O_SYNC == os.O_SYNC):
            names.append(name)
    return "|".join(names)


def signal_name(signo: int) -> str:
    try:
        return signal.Signals(signo).name
    except ValueError:
        if signal.SIGRTMIN < signo < signal.SIGRTMAX:
            return f"SIGRTMIN+{signo - signal.SIGRTMIN}"
        return f"signal {signo}"


def siginfo_signal(encoded: str) -> str:
    """The signal named by a base64 siginfo_t (si_signo is its first int)."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return "?"
    if len(raw) < 4:
        return "?"
    return signal_name(int.from_bytes(raw[:4], "little", signed=True))


def syscall_state(regs: dict) -> str:
    """orig_rax is stored unsigned: all ones (-1) means the thread was not in a system call."""
    nr = regs["orig_rax"]
    if nr == NOT_IN_SYSCALL or nr >= 1 << 63:
        return "no"
    return f"{_SYSCALLS[nr]} ({nr})" if nr in _SYSCALLS else f"syscall {nr}"


def _table(headers: list[str], rows: list[list[str]], indent: str) -> list[str]:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return [
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]


def _network(network: dict | None) -> str:
    if network is None:
        return "the node's"
    text = f"its own: {network['address']}, host name {network['hostname']}"
    part = network.get("overlay")
    if part:
        text += (f"; part at slot {part['slot']} of a job on {len(part['names'])} nodes, "
                 f"overlay {part['network']} (VXLAN id {part['vni']})")
    return text


def cuda_release(version: int) -> str:
    """cuDriverGetVersion's 12080 as people write it: 12.8."""
    return f"{version // 1000}.{version % 1000 // 10}"


def _gpu(record: dict | None) -> list[str]:
    if record is None:
        return []
    driver = f"driver {record['driver']}, " if record["driver"] else ""
    lines = [f"gpu         {driver}CUDA {cuda_release(record['cuda_version'])}; the driver "
             f"checkpointed the GPU state of these in {record['checkpoint_s']:.3f} s:"]
    for proc in record["processes"]:
        devices = ", ".join(f"{d['uuid']} ({d['model']})" for d in proc["devices"])
        lines.append(f"  GPU process {proc['pid']}" + (f" on {devices}" if devices else ""))
    return lines


def _chain(chain: list[dict]) -> list[str]:
    """An incremental image's chain, down to its full image (image/chain.py)."""
    if len(chain) == 1 and not chain[0]["problem"]:
        return ["pages       a full image: every page of its own"]
    lines = ["pages       incremental: the pages that did not change are its parent's"]
    for link in chain:
        name = Path(link["image"]).resolve().name  # not "latest"
        lines.append(f"  {name:<12} {link['own_pages']} pages of its own "
                     f"({human_size(link['own_pages'] * PAGE_SIZE)}), "
                     f"{link['inherited_pages']} left to its parent")
        if link["problem"]:
            lines.append(f"  BROKEN: {link['problem']}")
    return lines


def _vma_path(vma: dict) -> str:
    path = vma["path"] or ""
    if vma["file"] and vma["file"]["ghost"]:
        path += f" (deleted, saved as {vma['file']['ghost']})"
    notes = [ADVICE_NAMES.get(a, a) for a in vma["advice"]]
    if vma["policy"] is not None:
        notes.append(f"NUMA policy {vma['policy']}")
    if vma["shared"] and vma["may_write"] and "w" not in vma["prot"]:
        notes.append("may become writable")
    return f"{path} [{', '.join(notes)}]".lstrip() if notes else path


def _endpoint(end: dict | None) -> str:
    if end is None:
        return "*"
    return f"[{end['addr']}]:{end['port']}" if ":" in end["addr"] else \
        f"{end['addr']}:{end['port']}"


def _fd_path(fd: dict) -> str:
    path = fd["path"] or ""
    if fd["kind"] == "inet":
        path += f" {fd['proto'].upper()} {_endpoint(fd['local'])}"
        if fd["remote"]:
            path += f" -> {_endpoint(fd['remote'])}"
        path += f" {fd['state']}"
    if fd["kind"] == "inotify":
        path += " watching " + ", ".join(f"{w['path']} (wd {w['wd']}, mask {w['mask']:#x})"
                                         for w in fd["watches"])
    if fd["ghost"]:
        path += f" (deleted, saved as {fd['ghost']})"
    for lock in fd["locks"]:
        span = "" if lock["kind"] == "flock" else \
            f" bytes {lock['start']}-{'EOF' if lock['end'] is None else lock['end']}"
        path += f" [{lock['kind']} {lock['type']} lock{span}]"
    return path


def _render_process(proc: dict, forked_pages: int) -> list[str]:
    if proc["exit_status"] is not None:
        status = proc["exit_status"]
        how = (f"exit code {os.WEXITSTATUS(status)}" if os.WIFEXITED(status)
               else f"killed by signal {os.WTERMSIG(status)}")
        return [f"process {proc['pid']} ({proc['comm']})",
                f"  zombie    {how}, not yet reaped by its parent {proc['ppid']}"]
    creds = proc["creds"]
    lines = [
        f"process {proc['pid']} ({proc['comm']})" + (" — stopped" if proc["stopped"] else ""),
        f"  ppid {proc['ppid']}  pgid {proc['pgid']}  sid {proc['sid']}",
        f"  exe       {proc['exe']}",
        f"  cmdline   {shlex.join(proc['cmdline'])}",
        f"  uid       {'/'.join(map(str, creds['uid']))}  (real/effective/saved/fs)",
        f"  gid       {'/'.join(map(str, creds['gid']))}",
        f"  cwd       {proc['cwd']}",
        f"  threads   {len(proc['threads'])}"
        + (" (the main thread has exited)" if proc["main_thread_exited"] else ""),
    ]
    if proc["shares_with_parent"]:
        names = {"files": "descriptor table", "fs": "cwd and umask", "vm": "address space",
                 "sighand": "signal handlers"}
        shared = " and ".join(names.get(k, k) for k in proc["shares_with_parent"])
        lines.append(f"  shares    its {shared} with its parent {proc['ppid']} (not as a thread)")
    lines += _table(
        ["TID", "COMM", "RIP", "IN SYSCALL"],
        [
            [str(t["tid"]), t["comm"], f"{t['regs']['rip']:#018x}", syscall_state(t["regs"])]
            for t in proc["threads"]
        ],
        "    ",
    )

    vmas = proc["vmas"]
    kinds = ", ".join(f"{kind} {n}" for kind, n in Counter(v["kind"] for v in vmas).items())
    mapped = sum(v["end"] - v["start"] for v in vmas)
    lines.append(
        f"  memory    {len(vmas)} VMAs ({kinds}), {human_size(mapped)} mapped, "
        f"{proc['nr_pages']} pages saved ({human_size(proc['nr_pages'] * PAGE_SIZE)})"
        + (f", {forked_pages} shared with its parent since fork (saved with the parent's)"
           if forked_pages else "")
    )
    lines += _table(
        ["START-END", "PROT", "KIND", "SIZE", "SAVED", "PATH"],
        [
            [
                f"{v['start']:012x}-{v['end']:012x}", v["prot"], v["kind"],
                human_size(v["end"] - v["start"]), str(v["saved_pages"]), _vma_path(v),
            ]
            for v in vmas
        ],
        "    ",
    )

    lines.append(f"  fds       {len(proc['fds'])}")
    lines += _table(
        ["FD", "DESC", "KIND", "POS", "FLAGS", "CLOEXEC", "PATH"],
        [
            [
                str(f["fd"]), str(f["desc"]), f["kind"], str(f["pos"]), open_flags(f["flags"]),
                "yes" if f["cloexec"] else "no", _fd_path(f),
            ]
            for f in proc["fds"]
        ],
        "    ",
    )

    pending = [f"{siginfo_signal(s)} (process)" for s in proc["shared_pending"]]
    pending += [
        f"{siginfo_signal(s)} (thread {t['tid']})" for t in proc["threads"] for s in t["pending"]
    ]
    lines.append(
        f"  signals   handlers: {len(proc['sigactions'])}, "
        f"pending: {', '.join(pending) if pending else 'none'}"
    )
    return lines


def render(path: str | Path, as_json: bool = False) -> str:
    """`path` an image, or a checkpoint of a job on several nodes (an image per part)."""
    parts = sorted(Path(path).glob(f"{PART}*"), key=lambda p: p.name.removeprefix(PART).zfill(9))
    if parts and not (Path(path) / "image.json").exists():
        return _render_parts(Path(path), parts, as_json)
    return _render_image(path, as_json)


def _render_parts(path: Path, parts: list[Path], as_json: bool) -> str:
    try:
        figures = json.loads((path / FIGURES).read_text())
    except (OSError, ValueError):
        figures = None  # a checkpoint still being taken, or abandoned
    if as_json:
        return json.dumps({"path": str(path), "coordination": figures,
                           "parts": [json.loads(_render_image(p, True)) for p in parts]},
                          indent=2, sort_keys=True)
    lines = [f"checkpoint  {path}: a job on {len(parts)} nodes, an image per node's part"]
    if isinstance(figures, dict):
        lines.append("coordinated " + ", ".join(f"{k} {v}" for k, v in sorted(figures.items())))
    else:
        lines.append(f"coordinated no {FIGURES}: not committed (taken now, or abandoned)")
    for part in parts:
        lines += ["", f"=== {part.name} ===", _render_image(part, False).rstrip("\n")]
    return "\n".join(lines) + "\n"


def _render_image(path: str | Path, as_json: bool) -> str:
    reader = ImageReader(path)
    meta = reader.meta()
    problems = dict(reader.iter_problems())
    files = [
        {"name": f.name, "size": f.size, "xxh3_128": f.digest, "ok": f.name not in problems}
        for f in sorted(reader.files.values())
    ]
    chain = links(reader)
    forked = {p["pid"]: forked_pages(reader, p["pid"]) for p in meta["processes"]}
    if as_json:
        doc = {
            "path": str(reader.path),
            "checksums_ok": not problems,
            "problems": list(problems.values()),
            "files": files,
            "image": meta,
            "chain": chain,
            "forked_pages": {str(pid): n for pid, n in forked.items() if n},
        }
        return json.dumps(doc, indent=2, sort_keys=True)

    cpu, timing = meta["cpu"], meta["timing"]
    verdict = "OK" if not problems else "MISMATCH in " + ", ".join(problems)
    lines = [
        f"image       {reader.path}",
        f"format      {meta['format']} version {meta['format_version']}, "
        f"written by hpccr {meta['hpccr_version']}",
        f"created     {meta['created']} on {meta['hostname']} (kernel {meta['kernel']})",
        f"cpu         xfeatures {cpu['xfeatures']:#x}, xstate size {cpu['xstate_size']} bytes",
        f"timing      frozen {timing['frozen_s']:.3f} s, dump {timing['dump_s']:.3f} s",
        f"root pid    {meta['root_pid']}, {len(meta['processes'])} process(es)"
        + (", in a pid namespace of its own (hpccr run)" if meta["pidns"] else ""),
        f"network     {_network(meta['network'])}",
        *_gpu(meta.get("gpu")),
        *_chain(chain),
        f"checksums   {verdict}",
    ]
    lines += [f"  {message}" for message in problems.values()]
    for proc in meta["processes"]:
        lines += ["", *_render_process(proc, forked[proc["pid"]])]
    lines += ["", f"files       {len(files)}"]
    lines += _table(
        ["NAME", "SIZE", "XXH3-128", ""],
        [
            [f["name"], human_size(f["size"]), f["xxh3_128"], "" if f["ok"] else "MISMATCH"]
            for f in files
        ],
        "  ",
    )
    return "\n".join(lines) + "\n"
