"""`hpccr sbatch`: submit a job that runs under hpccr, on a site without the SPANK plugin.

The user's command line is split into hpccr's own options, sbatch's options, the script and its
arguments.  sbatch gets the same options and, on stdin, a generated wrapper script that holds
the script's own #SBATCH lines (so they keep working), then hpccr's: --requeue,
--open-mode=append, --signal=B:USR1@<grace> and --job-name=<script name> (sbatch would
otherwise name the job after its stdin), each unless the user chose otherwise on the command
line or in an #SBATCH line.  The wrapper runs the script, by its #! interpreter, under
`hpccr slurm job`; `scontrol write batch_script <job>` shows it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hpccr.duration import parse_duration

# sbatch options (Slurm 22.05) whose value may be the next argument.  Any other option is taken
# as a flag: write unusual options with their value attached (--opt=value).
SHORT_WITH_VALUE = set("aAbBcCdDeFGiJLmMnNopqStwx")
LONG_WITH_VALUE = {
    "account", "acctg-freq", "array", "batch", "bb", "bbf", "begin", "chdir", "clusters",
    "cluster-constraint", "comment", "constraint", "container", "core-spec", "cores-per-socket",
    "cpu-freq", "cpus-per-gpu", "cpus-per-task", "deadline", "delay-boot", "dependency",
    "distribution", "error", "export-file", "extra-node-info", "gid", "gpu-bind", "gpu-freq",
    "gpus", "gpus-per-node", "gpus-per-socket", "gpus-per-task", "gres", "gres-flags", "hint",
    "input", "job-name", "licenses", "mail-type", "mail-user", "mcs-label", "mem", "mem-bind",
    "mem-per-cpu", "mem-per-gpu", "mincpus", "network", "nodefile", "nodelist", "nodes",
    "ntasks", "ntasks-per-core", "ntasks-per-gpu", "ntasks-per-node", "ntasks-per-socket",
    "open-mode", "output", "partition", "power", "prefer", "priority", "profile", "qos",
    "reservation", "signal", "sockets-per-node", "switches", "thread-spec", "threads-per-core",
    "time", "time-min", "tmp", "tres-per-task", "uid", "wckey", "exclude", "wrap",
}
OURS = ("checkpoint", "checkpoint-dir")


class SbatchUsage(ValueError):
    """The command line cannot be split into sbatch options and a script."""


@dataclass
class Submission:
    checkpoint: int | None = None  # seconds
    checkpoint_dir: str | None = None
    sbatch_args: list[str] = field(default_factory=list)
    script: str | None = None
    script_args: list[str] = field(default_factory=list)
    wrap: str | None = None


def _long_name(arg: str) -> str:
    return arg[2:].split("=", 1)[0]


def split_args(args: list[str]) -> Submission:
    """Split `[hpccr and sbatch options] script [args]` (or `--wrap=CMD`)."""
    sub = Submission()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        value_next = False
        if arg.startswith("--"):
            name = _long_name(arg)
            value_next = "=" not in arg and name in LONG_WITH_VALUE | set(OURS)
        else:  # a cluster of short flags, the last one perhaps taking a value
            for pos, letter in enumerate(arg[1:], start=1):
                if letter in SHORT_WITH_VALUE:
                    value_next = pos == len(arg) - 1
                    break
        option = [arg]
        if value_next:
            if i + 1 >= len(args):
                raise SbatchUsage(f"option {arg} needs a value")
            option.append(args[i + 1])
        i += len(option)
        value = option[1] if value_next else arg.partition("=")[2]
        if arg.startswith("--") and _long_name(arg) == "checkpoint":
            try:
                sub.checkpoint = parse_duration(value)
            except ValueError as exc:
                raise SbatchUsage(f"--checkpoint: {exc}") from None
        elif arg.startswith("--") and _long_name(arg) == "checkpoint-dir":
            sub.checkpoint_dir = os.path.abspath(value)
        elif arg.startswith("--") and _long_name(arg) == "wrap":
            sub.wrap = value
        else:
            sub.sbatch_args += option
    rest = args[i:]
    if sub.wrap is not None:
        if rest:
            raise SbatchUsage("--wrap takes no script")
    elif not rest or rest[0] == "-":
        raise SbatchUsage("no batch script given (hpccr sbatch does not read it from stdin)")
    else:
        sub.script, sub.script_args = os.path.abspath(rest[0]), rest[1:]
    return sub


def script_header(text: str) -> list[str]:
    """The #SBATCH lines sbatch itself would read: those before the first command."""
    lines = []
    for line in text.splitlines()[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if stripped.startswith("#SBATCH"):
            lines.append(stripped)
    return lines


def _option_names(sbatch_args: list[str], header: list[str]) -> set[str]:
    tokens = list(sbatch_args)
    for line in header:
        try:
            tokens += shlex.split(line[len("#SBATCH"):], comments=True)
        except ValueError:
            continue
    names = {_long_name(t) for t in tokens if t.startswith("--")}
    names |= {t[1] for t in tokens if t.startswith("-") and not t.startswith("--") and len(t) > 1}
    return names


def build(sub: Submission, grace: int, hpccr: list[str]) -> str:
    """The wrapper script to feed sbatch on stdin."""
    if sub.wrap is not None:
        header, command, name = [], ["/bin/sh", "-c", sub.wrap], "wrap"
    else:
        try:
            text = Path(sub.script).read_text(errors="replace")
        except OSError as exc:
            raise SbatchUsage(f"cannot read {sub.script}: {exc.strerror}") from None
        first = text.splitlines()[0] if text else ""
        if not first.startswith("#!"):
            raise SbatchUsage(f"{sub.script} does not start with #! (not a batch script)")
        header, name = script_header(text), Path(sub.script).name
        command = [*first[2:].strip().split(None, 1), sub.script, *sub.script_args]
    given = _option_names(sub.sbatch_args, header)
    added = []
    if not {"requeue", "no-requeue"} & given:
        added.append("#SBATCH --requeue")
    if "open-mode" not in given:
        added.append("#SBATCH --open-mode=append")
    if "signal" not in given:
        added.append(f"#SBATCH --signal=B:USR1@{grace}")
    if not {"job-name", "J"} & given:
        added.append(f"#SBATCH --job-name={shlex.quote(name)}")
    job = [*hpccr, "slurm", "job"]
    if sub.checkpoint:
        job.append(f"--checkpoint={sub.checkpoint}s")
    if sub.checkpoint_dir:
        job.append(f"--checkpoint-dir={sub.checkpoint_dir}")
    job += ["--", *command]
    origin = "--wrap" if sub.wrap is not None else sub.script
    return "\n".join([
        "#!/bin/bash",
        *header,
        *added,
        f"# Generated by `hpccr sbatch` for {origin}: runs it under hpccr so that it can be",
        "# checkpointed and restarted.  If hpccr cannot be started on the node, the job runs",
        "# without checkpoints.",
        "shopt -s execfail",
        f"exec {shlex.join(job)}",
        f'echo "hpccr: cannot run {shlex.quote(hpccr[0])}; job $SLURM_JOB_ID runs without '
        'checkpoints" >&2',
        f"exec {shlex.join(command)}",
        "",
    ])


def submit(args: list[str], grace: int) -> int:
    """Submit; sbatch prints the job id (or its error) itself.  Returns sbatch's exit code."""
    sub = split_args(args)
    wrapper = build(sub, grace, [sys.executable, "-m", "hpccr"])
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SbatchUsage("sbatch not found in PATH")
    return subprocess.run([sbatch, *sub.sbatch_args], input=wrapper, text=True).returncode
