"""The hpccr command line: one click group, one function per command.

Every hpccr error becomes one line on stderr and the exit code of its class (hpccr.errors), a
bad command line one line and exit code 2; a traceback is only ever shown for a bug, never for
bad input.
"""

from __future__ import annotations

import contextlib
import os
import sys

import click

from hpccr import __version__
from hpccr.errors import HpccrError


class HpccrGroup(click.Group):
    def main(self, *args, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:  # a bad command line (exit code 2) among them
            click.echo(f"hpccr: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("hpccr: interrupted", err=True)
            sys.exit(130)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HpccrError as exc:
            click.echo(f"hpccr: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("hpccr: interrupted", err=True)
            sys.exit(130)


@click.group(cls=HpccrGroup)
@click.version_option(__version__, prog_name="hpccr")
def main() -> None:
    """Transparent checkpoint/restart of running processes and HPC jobs."""


@main.command()
@click.argument("pid", type=int)
@click.option("-D", "--images-dir", "directory", required=True, type=click.Path(),
              help="Directory to write the checkpoint image to (created if needed).")
@click.option("--leave-running", "mode", flag_value="running",
              help="Let the process run on after the dump.")
@click.option("--leave-stopped", "mode", flag_value="stopped",
              help="Leave the process stopped (SIGSTOP) after the dump.")
@click.option("--compress/--no-compress", default=None,
              help="Compress the memory pages with zstd (default: the site's compress).")
def dump(pid: int, directory: str, mode: str | None, compress: bool | None) -> None:
    """Checkpoint process PID (all its threads). By default it is killed once the image is
    complete, like `criu dump`."""
    from hpccr.engine.dump import dump as do_dump

    result = do_dump(pid, directory, mode or "kill", compress=compress)
    gpu = f", GPU state {result.gpu_s * 1000:.1f} ms" if result.gpu_s else ""
    click.echo(f"dumped process {pid} to {result.path}: {result.pages} pages, "
               f"frozen {result.frozen_s * 1000:.1f} ms{gpu}, total {result.dump_s * 1000:.1f} "
               "ms", err=True)


class Duration(click.ParamType):
    name = "duration"

    def convert(self, value, param, ctx):
        from hpccr.duration import parse_duration

        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class SignalName(click.ParamType):
    name = "signal"

    def convert(self, value, param, ctx):
        import signal

        name = str(value).upper()
        try:
            return signal.Signals(int(name)) if name.isdigit() else signal.Signals[
                name if name.startswith("SIG") else "SIG" + name]
        except (KeyError, ValueError):
            self.fail(f"not a signal: {value}", param, ctx)


def supervision_options(f):
    """The options `run` and `restore` share: periodic and final checkpoints, and the user."""
    for decorator in reversed([
        click.option("--interval", type=Duration(),
                     help="Checkpoint the whole job this often: 90s, 30m, 2h, or Slurm's MM:SS, "
                          "HH:MM:SS, D-HH (a bare number counts minutes, as in Slurm)."),
        click.option("--keep", default=2, show_default=True, type=click.IntRange(min=1),
                     help="How many of the newest checkpoints to keep."),
        click.option("--checkpoint-on", "stop_signals", type=SignalName(), multiple=True,
                     help="On this signal (repeatable), checkpoint the job one last time and "
                          "stop it; exit 75 (the job is not finished)."),
        click.option("--events-fd", type=int, hidden=True,
                     help="A socket to announce each checkpoint on (hpccr.events)."),
        click.option("--user", "user_spec", metavar="USER",
                     help="As root, for USER: the job runs as USER, images are read and written "
                          "with USER's file rights, and restored processes may have no more "
                          "than USER's credentials."),
    ]):
        f = decorator(f)
    return f


def _act_for(user_spec: str | None):
    from hpccr.user import User

    if user_spec is None:
        return None
    user = User.lookup(user_spec)
    user.take_fs_rights()
    return user


@main.command()
@click.option("-D", "--images-dir", "directory", required=True, type=click.Path(),
              help="Checkpoint image directory to restore (or a series: its latest image).")
@click.option("--detach", is_flag=True,
              help="Return once the process runs instead of waiting for it to exit.")
@click.option("--pidfile", type=click.Path(), help="Write the restored process's pid here.")
@click.option("--lazy", is_flag=True,
              help="With --detach: return once the job runs, before its memory is back; a "
                   "process of hpccr's places the pages the job touches first, all the others "
                   "meanwhile, and ends when they are in.  Until then the job dies with it "
                   "(see README).")
@click.option("--tcp-close", is_flag=True, default=None,
              help="A TCP connection whose local address does not exist here (restored on "
                   "another node) comes back reset instead of failing the restore.  Default: "
                   "the site's tcp_close setting.")
@supervision_options
def restore(directory: str, detach: bool, pidfile: str | None, lazy: bool,
            tcp_close: bool | None, interval: int | None, keep: int,
            stop_signals: tuple[int, ...], events_fd: int | None, user_spec: str | None) -> None:
    """Restore a checkpoint image. Without --detach, wait for the restored process and exit
    with its exit status (128+N if killed by signal N), like cr_restart.  With --interval or
    --checkpoint-on, -D is a series (as `hpccr run -D` writes it) and the restored job goes on
    being checkpointed into it."""
    from pathlib import Path

    from hpccr import config
    from hpccr.engine.lazy import restore_detached
    from hpccr.engine.restore import restore_tree
    from hpccr.image.series import Series, resolve
    from hpccr.run import Checkpoints, Supervision, job_part

    supervised = bool(interval or stop_signals)
    if supervised and detach:
        raise click.UsageError("--detach cannot go with --interval or --checkpoint-on")
    if lazy and not detach:
        raise click.UsageError("--lazy needs --detach (the pages are placed by a process of "
                               "its own, not by the command)")
    part = job_part()
    slot = part.slot if part else None
    if supervised and resolve(directory, slot) == Path(directory):
        raise click.UsageError("--interval and --checkpoint-on need -D to be a series "
                               "directory (as `hpccr run -D` writes it), not one image")
    checkpoints = Checkpoints(Series(directory), interval, keep, stop_signals,
                              _events(events_fd), part)
    user = _act_for(user_spec)
    with _pidfile_for(pidfile) as write_pid:
        supervision = None if detach else Supervision(checkpoints)
        if tcp_close is None:
            tcp_close = config.load().tcp_close
        if lazy:
            root, network = restore_detached(directory, user, tcp_close, part), None
        else:
            root, network = restore_tree(directory, user, tcp_close, part)
        checkpoints.notify("restored", path=str(resolve(directory, slot)))
        write_pid(root)
    if supervision is None:
        if network is not None:
            network.release()  # the job holds it; lift_stale removes it after the job
        sys.exit(0)
    sys.exit(supervision.run(root, network))


def _events(fd: int | None):
    from hpccr.events import EventChannel

    if fd is None:
        return None
    try:
        os.set_inheritable(fd, False)
        return EventChannel(fd)
    except OSError as exc:
        raise click.BadParameter(f"{fd}: {exc.strerror}", param_hint="--events-fd") from None


@contextlib.contextmanager
def _pidfile_for(pidfile: str | None):
    """Yields a function that writes the job's pid into `pidfile`, opened before the job
    starts (once it runs, hpccr must not fail on it); removed again if the job never starts."""
    if pidfile is None:
        yield lambda pid: None
        return
    try:
        out = open(pidfile, "w")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise click.BadParameter(f"cannot write {pidfile}: {exc.strerror}",
                                 param_hint="--pidfile") from None
    written = []

    def write(pid: int) -> None:
        out.write(f"{pid}\n")
        out.close()
        written.append(pid)

    try:
        yield write
    finally:
        if not written:
            out.close()
            with contextlib.suppress(OSError):
                os.unlink(pidfile)


@main.command()
@click.argument("directory", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(directory: str, as_json: bool) -> None:
    """Show what a checkpoint image holds (no ptrace, read-only)."""
    from hpccr.image.show import render

    click.echo(render(directory, as_json=as_json))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check(as_json: bool) -> None:
    """Probe the kernel features hpccr needs (and those it can use) on throwaway children, and
    say whether dump and restore will work here. Exits 21 if a required one does not work."""
    from hpccr.engine.check import run_checks

    report = run_checks()
    click.echo(report.render(as_json=as_json))
    report.raise_if_failed()


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("-D", "--images-dir", "directory", type=click.Path(),
              help="Directory for the job's checkpoints (one sub-directory each, and 'latest').")
@click.option("--pidfile", type=click.Path(), help="Write the job's pid (its hpccr-init) here.")
@click.option("--network", type=click.Choice(["own", "host"]), default=None,
              help="own: the job gets a network namespace, address and host name of its own, "
                   "which stay the same on whatever node it is restored; host: the node's "
                   "network (a job holding sockets then restores only on this node).  "
                   "Default: the site's job_network (own).")
@supervision_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(directory: str | None, pidfile: str | None, network: str | None, interval: int | None,
        keep: int, stop_signals: tuple[int, ...], events_fd: int | None, user_spec: str | None,
        command: tuple[str, ...]) -> None:
    """Run COMMAND as a job in its own pid namespace, so that its checkpoints can always be
    restored with the same pids; exit with its status.  Put `--` before COMMAND."""
    from hpccr.image.series import Series
    from hpccr.run import Checkpoints, Supervision, job_part, new_network, start_job

    if (interval or stop_signals) and not directory:
        raise click.UsageError("--interval and --checkpoint-on need -D/--images-dir")
    checkpoints = Checkpoints(Series(directory) if directory else None, interval, keep,
                              stop_signals, _events(events_fd), job_part())
    user = _act_for(user_spec)
    with _pidfile_for(pidfile) as write_pid:
        supervision = Supervision(checkpoints)
        job_network = new_network(network)
        pid = start_job(list(command), user, network=job_network)
        click.echo(f"hpccr run: job pid {pid}", err=True)
        write_pid(pid)
    sys.exit(supervision.run(pid, job_network))


# --- Slurm ---------------------------------------------------------------------------------


@main.group()
def slurm() -> None:
    """Slurm integration: prolog, epilog and the job wrapper (see docs/slurm.md)."""


@slurm.command()
def prolog() -> None:
    """Prolog (run as root by slurmd): check the node, create the job's checkpoint directory.
    Always exits 0, so that jobs run even where they cannot be checkpointed."""
    from hpccr.slurm.node import prolog as do_prolog

    do_prolog()


@slurm.command()
def epilog() -> None:
    """Epilog (run as root by slurmd): record the job's checkpoints, remove them once the job
    completed for good.  Always exits 0."""
    from hpccr.slurm.node import epilog as do_epilog

    do_epilog()


@slurm.command(hidden=True)
@click.option("--job-id", required=True)
@click.option("--uid", required=True, type=int)
@click.option("--node", required=True)
def agent(job_id: str, uid: int, node: str) -> None:
    """The job's privileged agent (started by the prolog, as root): runs or restores the job
    for its user when the job's `hpccr slurm job` asks."""
    from hpccr import config
    from hpccr.errors import AccessDenied
    from hpccr.slurm.agent import serve

    if os.geteuid() != 0:
        raise AccessDenied("the hpccr agent runs as root (started by the Slurm prolog)")
    sys.exit(serve(config.load().run_dir, job_id, node, uid))


@slurm.command(context_settings={"ignore_unknown_options": True})
@click.option("--checkpoint", "interval", type=Duration(), envvar="HPCCR_CHECKPOINT_INTERVAL",
              help="Checkpoint this often (as `hpccr run --interval`); default: only when "
                   "Slurm warns the job.  [env: HPCCR_CHECKPOINT_INTERVAL]")
@click.option("--checkpoint-dir", "directory", type=click.Path(), envvar="HPCCR_CHECKPOINT_DIR",
              help="The job's checkpoint series; default <checkpoint_base>/<user>/<jobid>.  "
                   "[env: HPCCR_CHECKPOINT_DIR]")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def job(interval: int | None, directory: str | None, command: tuple[str, ...]) -> None:
    """Run a batch script as a checkpointed job (started by the SPANK plugin's job.sh or by
    `hpccr sbatch`'s wrapper); exit with its status.  Put `--` before COMMAND."""
    from hpccr.slurm.job import run_job

    sys.exit(run_job(list(command), interval, directory))


@slurm.command(hidden=True)
@click.option("--checkpoint-dir", "directory", type=click.Path(), required=True)
@click.option("--restore", is_flag=True, help="Restore this node's part of the latest checkpoint.")
def part(directory: str, restore: bool) -> None:
    """This node's part of a job on several nodes (started by the batch host's `hpccr slurm
    job` with srun, on every other node of the job)."""
    from hpccr.slurm.job import run_part

    sys.exit(run_part(directory, restore))


@main.command(context_settings={"ignore_unknown_options": True,
                                "allow_interspersed_args": False})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def sbatch(args: tuple[str, ...]) -> None:
    """Submit a job that runs under hpccr, for sites without the SPANK plugin:
    hpccr sbatch [--checkpoint=INTERVAL] [--checkpoint-dir=DIR] [sbatch options] SCRIPT [ARGS]
    (or --wrap=CMD).  Adds --requeue, --open-mode=append and --signal=B:USR1@<grace> unless
    given; the script's #SBATCH lines keep working.  sbatch prints the job id."""
    from hpccr import config
    from hpccr.slurm.sbatch import SbatchUsage, submit

    grace = config.load().grace
    try:
        sys.exit(submit(list(args), grace))
    except SbatchUsage as exc:
        raise click.UsageError(str(exc)) from None
