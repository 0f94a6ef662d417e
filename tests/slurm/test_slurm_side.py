"""The Slurm side of hpccr on a real cluster: SPANK plugin, prolog/epilog, `hpccr sbatch`, hooks.

The module brings the test cluster up with hpccr's prolog, epilog and plugin (and JobRequeue=0,
so that Requeue=1 in `scontrol show job` shows hpccr's --requeue), and gives the session's
default cluster back at the end.  Jobs run as the ordinary user hpcuser unless a test says
otherwise; prolog and epilog run as root, with no PATH, as slurmd starts them.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys

import pytest
from hpccr_site import GRACE, REPO, Site, ended, log_lines, wait_for, write_script

SHOW = """#!/bin/bash
echo "args: $*"
echo "interval=$HPCCR_CHECKPOINT_INTERVAL dir=$HPCCR_CHECKPOINT_DIR"
echo "pid=$$ pid1=$(cat /proc/1/comm) uid=$(id -u)"
[ -n "$HPCCR_CHECKPOINT_DIR" ] && stat -c 'dir: %U %a' "$HPCCR_CHECKPOINT_DIR"
exit 0
"""

HOOKS = """import json, os

def boom(info):
    raise RuntimeError("the site hook exploded")

def record(info):
    with open(os.environ["HOOK_RECORD"], "a") as f:
        f.write(json.dumps(info) + "\\n")
"""


# --- the SPANK plugin --------------------------------------------------------------------------


def test_plugin_options_in_sbatch_help(site):
    out = site.cluster.client("sbatch", "--help", user="hpcuser").stdout
    plugins = out[out.index("Options provided by plugins:"):]
    assert "--checkpoint=interval" in plugins and "--checkpoint-dir=dir" in plugins


@pytest.mark.parametrize("option, message", [
    ("--checkpoint=soon", "hpccr: --checkpoint: 'soon' is not a positive duration (e.g. 90s, "
                          "30m, 2h, MM:SS, HH:MM:SS, D-HH)"),
    ("--checkpoint=0", "hpccr: --checkpoint: '0' is not a positive duration"),
    ("--checkpoint-dir=ckpt", "hpccr: --checkpoint-dir: 'ckpt' is not an absolute path"),
])
def test_bad_option_value_fails_the_submission(site, option, message):
    run = site.cluster.client("sbatch", option, "--wrap", "true", user="hpcuser", check=False)
    assert run.returncode != 0
    assert message in run.stderr and run.stdout == ""


def test_root_job_runs_under_hpccr_run(site):
    c = site.cluster
    script = write_script(site, "show-root.sh", SHOW)
    out = c.job_dir / "show-root.out"
    job = site.submit("--checkpoint=30m", "-o", str(out), str(script), "a", "b c", user=None)
    c.wait_state(job, "COMPLETED", 60)
    text = out.read_text()
    assert "args: a b c" in text
    assert f"interval=1800s dir={site.job_dir('root', job)}" in text
    # pid 1 of the job's own pid namespace is hpccr-init; the script is its first child
    assert "pid=2 pid1=hpccr-init uid=0" in text
    assert "dir: root 700" in text
    assert "removed" not in ended(site, job) and "nothing to keep" in ended(site, job)


def test_user_job_runs_under_hpccr_through_its_agent(site):
    """The plugin wraps a user's job too: the prolog's agent runs it for the user, in a pid
    namespace of its own, as the user."""
    c = site.cluster
    script = write_script(site, "show-user.sh", SHOW)
    out = c.job_dir / "show-user.out"
    job = site.submit("--checkpoint=1:30", "-o", str(out), str(script), "x")
    c.wait_state(job, "COMPLETED", 60)
    text = out.read_text()
    uid = pwd.getpwnam("hpcuser").pw_uid
    assert f"interval=90s dir={site.job_dir('hpcuser', job)}" in text
    assert "dir: hpcuser 700" in text  # made by the prolog, as root, for the user
    assert "args: x" in text
    assert f"pid=2 pid1=hpccr-init uid={uid}" in text
    assert "without checkpoints" not in text
    started = next(line for line in log_lines(site, job) if "hpccr-prolog" in line)
    assert f"run 0 of hpcuser: {site.job_dir('hpcuser', job)} ready; checkpointing" in started


def test_checkpoint_dir_option_reaches_the_job(site):
    c = site.cluster
    script = write_script(site, "show-dir.sh", SHOW)
    out = c.job_dir / "show-dir.out"
    chosen = c.job_dir / "my-checkpoints"
    job = site.submit(f"--checkpoint-dir={chosen}", "-o", str(out), str(script))
    c.wait_state(job, "COMPLETED", 60)
    text = out.read_text()
    assert f"interval= dir={chosen}" in text
    assert "dir: hpcuser 700" in text  # made by the job itself, as its user


# --- prolog and epilog -------------------------------------------------------------------------

FAKE_CHECKPOINT = """#!/bin/bash
# Stands in for a job whose hpccr wrote checkpoints: a series as hpccr run leaves it, plus
# what a checkpoint cut off by the end of the job leaves behind.
dir={base}/$SLURM_JOB_USER/$SLURM_JOB_ID
mkdir -p $dir/ckpt-0001 $dir/.ckpt-0002.partial-1a2b
head -c 300000 /dev/zero > $dir/ckpt-0001/pages
ln -sfn ckpt-0001 $dir/latest
echo "run ${{SLURM_RESTART_COUNT:-0}}"
{tail}
"""


def test_epilog_removes_checkpoints_of_a_finished_job(site):
    """Two nodes share the directory (one file system): only the batch host touches it."""
    c = site.cluster
    script = write_script(site, "ok.sh", FAKE_CHECKPOINT.format(base=site.base, tail="exit 0"))
    job = site.submit("-N2", "-o", "/dev/null", str(script))
    batch_host = c.wait_state(job, "COMPLETED", 60)["BatchHost"]
    line = ended(site, job)
    assert re.search(rf" {batch_host} hpccr-epilog\[\d+\]: job {job}: run 0 ended: exit 0:0; "
                     r"checkpoints: ckpt-0001 \(293\.0 KiB, \S+\), latest -> ckpt-0001; "
                     r"cleaned up \.ckpt-0002\.partial-1a2b; removed \(job finished\)",
                     line), line
    assert not site.job_dir("hpcuser", job).exists()
    other = ({"node1", "node2"} - {batch_host}).pop()
    prologs = [line for line in log_lines(site, job) if "hpccr-prolog" in line]
    assert len(prologs) == 2
    assert any(f" {other} " in line and f"(the job's directory is {batch_host}'s)" in line
               for line in prologs), prologs
    assert len(log_lines(site, job)) == 3  # the other node's epilog has nothing to say


def test_epilog_keeps_checkpoints_of_a_failed_job(site):
    c = site.cluster
    script = write_script(site, "fail.sh", FAKE_CHECKPOINT.format(base=site.base, tail="exit 3"))
    job = site.submit("-o", "/dev/null", str(script))
    c.wait_state(job, "FAILED", 60)
    assert "kept (the job did not complete successfully)" in ended(site, job)
    job_dir = site.job_dir("hpcuser", job)
    assert sorted(os.listdir(job_dir)) == ["RECORD", "ckpt-0001", "latest"]  # partial cleaned
    record = (job_dir / "RECORD").read_text().splitlines()
    assert re.fullmatch(r"\S+ node\d run 0 started; checkpointing possible", record[0])
    assert re.fullmatch(r"\S+ node\d run 0 ended: exit 3:0; checkpoints: ckpt-0001 .*, "
                        r"latest -> ckpt-0001; cleaned up \.ckpt-0002\.partial-1a2b; "
                        r"kept \(the job did not complete successfully\)", record[1])
    st = job_dir.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (pwd.getpwnam("hpcuser").pw_uid, 0o700)
    assert (job_dir / "RECORD").stat().st_uid == st.st_uid


def test_requeued_job_keeps_and_reuses_its_directory(site):
    c = site.cluster
    script = write_script(site, "requeue.sh",
                          FAKE_CHECKPOINT.format(base=site.base, tail="exec sleep 300"))
    out = c.job_dir / "requeue.out"
    job = site.submit("--requeue", "--open-mode=append", "-o", str(out), str(script))
    job_dir = site.job_dir("hpcuser", job)
    try:
        c.wait_state(job, "RUNNING", 30)
        wait_for(lambda: out.exists() and "run 0" in out.read_text(), what="the first run")
        c.scontrol("requeue", str(job))
        assert c.wait_state(job, "PENDING", 30)["Restarts"] == "1"
        assert "requeued (restart count 1); checkpoints: ckpt-0001" in ended(site, job)
        assert "kept for the restart" in ended(site, job)
        c.scontrol("update", f"JobId={job}", "StartTime=now")
        c.wait_state(job, "RUNNING", 60)
        wait_for(lambda: "run 1" in out.read_text(), what="the second run")
        record = (job_dir / "RECORD").read_text()
        assert " run 1 started; " in record  # the restart reused the directory
        assert (job_dir / "ckpt-0001" / "pages").stat().st_size == 300000
        assert any("(restart, 1 checkpoints)" in line for line in log_lines(site, job))
    finally:
        c.client("scancel", str(job))


# --- hpccr sbatch ------------------------------------------------------------------------------

HEADER_SCRIPT = """#!/bin/bash
# the user's own job script: not executable, options in #SBATCH lines
#SBATCH -N 1
#SBATCH --output={out}

echo "args: $*"
echo "interval=$HPCCR_CHECKPOINT_INTERVAL dir=$HPCCR_CHECKPOINT_DIR"
"""


def hpccr_sbatch(site: Site, *args: str) -> subprocess.CompletedProcess:
    return site.cluster.client(*site.env(), site.user_hpccr, "sbatch", *args, user="hpcuser")


def test_hpccr_sbatch_adds_requeue_append_and_signal(site):
    c = site.cluster
    out = c.job_dir / "wrapped.out"
    out.write_text("from before\n")
    shutil.chown(out, "hpcuser")
    script = c.job_dir / "wrapped.sh"
    script.write_text(HEADER_SCRIPT.format(out=out))
    script.chmod(0o644)
    run = hpccr_sbatch(site, "--checkpoint=45m", "-p", "batch", str(script), "a b", "c")
    job = int(re.fullmatch(r"Submitted batch job (\d+)\n", run.stdout).group(1))
    info = c.wait_state(job, "COMPLETED", 60)
    assert info["Requeue"] == "1" and info["JobName"] == "wrapped.sh"
    assert info["StdOut"] == str(out)
    batch = c.scontrol("write", "batch_script", str(job), "-")
    for line in ("#SBATCH -N 1", f"#SBATCH --output={out}", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", f"#SBATCH --signal=B:USR1@{GRACE}"):
        assert line + "\n" in batch
    text = out.read_text()
    assert text.startswith("from before\n")  # appended, not truncated
    assert "args: a b c" in text
    assert f"interval=2700s dir={site.job_dir('hpcuser', job)}" in text


def test_hpccr_sbatch_keeps_the_users_own_choices(site):
    c = site.cluster
    out = c.job_dir / "own.out"
    run = hpccr_sbatch(site, "--no-requeue", "--signal=B:USR2@30", "-J", "mine", "-o", str(out),
                       "--wrap", "echo wrapped $HPCCR_CHECKPOINT_DIR")
    job = int(run.stdout.split()[-1])
    info = c.wait_state(job, "COMPLETED", 60)
    assert info["Requeue"] == "0" and info["JobName"] == "mine"
    batch = c.scontrol("write", "batch_script", str(job), "-")
    assert "--signal" not in batch and "--requeue" not in batch
    assert "#SBATCH --open-mode=append" in batch
    assert f"wrapped {site.job_dir('hpcuser', job)}" in out.read_text()


def test_hpccr_sbatch_usage_errors(site):
    run = site.cluster.client(*site.env(), site.user_hpccr, "sbatch", "--checkpoint=never",
                              "job.sh", user="hpcuser", check=False)
    assert run.returncode == 2
    assert "--checkpoint: 'never' is not a duration" in run.stderr


# --- hooks and configuration -------------------------------------------------------------------


def test_failing_hook_is_reported_and_the_job_completes(site):
    c = site.cluster
    hooks = site.dir / "hooks"
    hooks.mkdir(mode=0o755, exist_ok=True)
    (hooks / "sitehooks.py").write_text(HOOKS)
    record = c.job_dir / "hooks.json"
    out = c.job_dir / "hooks.out"
    job = site.submit("--checkpoint=1h", "-o", str(out), "--wrap", "echo the job ran",
                      PYTHONPATH=str(hooks), HOOK_RECORD=str(record),
                      HPCCR_HOOKS_JOB_START="sitehooks:boom,nosuchmodule:fn,sitehooks:record",
                      HPCCR_HOOKS_JOB_END="sitehooks:record")
    c.wait_state(job, "COMPLETED", 60)
    text = out.read_text()
    assert "the job ran" in text
    assert re.search(r"hpccr: hook sitehooks:boom \(job_start\) failed: RuntimeError: the site "
                     r"hook exploded \[.*sitehooks\.py:\d+\]", text)
    assert "hpccr: hook nosuchmodule:fn (job_start) cannot be loaded: ModuleNotFoundError" in text
    start, end = (json.loads(line) for line in record.read_text().splitlines())
    node = c.job(job)["NodeList"]
    common = {"job_id": str(job), "node": node, "user": "hpcuser", "restart_count": 0,
              "checkpoint_dir": str(site.job_dir("hpcuser", job))}
    assert start == {"event": "job_start", **common, "interval": 3600,
                     "command": [str(c.dir / "spool" / node / f"job{job:05d}" / "slurm_script")]}
    assert end == {"event": "job_end", **common, "exit_code": 0}


@pytest.mark.parametrize("content, env, message", [
    ("keep = \n", {}, r"hpccr: error: {file}: Invalid value \(at line 1, column 8\)"),
    ("kep = 3\n", {}, r"hpccr: error: {file}: unknown setting 'kep' \(known: .*\)"),
    ("grace = 0\n", {}, r"hpccr: error: {file}: 'grace' must be 1\.\.65535 seconds, not 0"),
    ("", {"HPCCR_KEEP": "many"}, r"hpccr: error: HPCCR_KEEP: 'many' is not an integer"),
    ("tcp_close = 1\n", {}, r"hpccr: error: {file}: 'tcp_close' must be true or false, not 1"),
    ("", {"HPCCR_GPU_LOCK_TIMEOUT": "0"},
     r"hpccr: error: HPCCR_GPU_LOCK_TIMEOUT: 'gpu_lock_timeout' must be 1\.\.4000000 seconds, "
     "not 0"),
    ("full_every = 0\n", {}, r"hpccr: error: {file}: 'full_every' must be 1\.\.256, not 0"),
    ("", {"HPCCR_TCP_CLOSE": "maybe"},
     r"hpccr: error: HPCCR_TCP_CLOSE: 'maybe' is not one of true, 1, yes, false, 0, no"),
])
def test_configuration_errors_are_one_line(tmp_path, content, env, message):
    bad = tmp_path / "hpccr.toml"
    bad.write_text(content)
    run = subprocess.run([sys.executable, "-m", "hpccr", "sbatch", "--wrap", "true"],
                         env={**os.environ, "HPCCR_CONFIG": str(bad), **env},
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 1
    assert re.fullmatch(message.format(file=re.escape(str(bad))) + "\n", run.stderr), run.stderr


def test_shipped_configuration_is_the_default():
    from hpccr import config

    shipped = config.load({"HPCCR_CONFIG": str(REPO / "etc" / "hpccr.toml")})
    assert {"checkpoint_base": str(shipped.checkpoint_base), "keep": shipped.keep,
            "grace": shipped.grace, "log_dir": str(shipped.log_dir),
            "run_dir": str(shipped.run_dir), "tcp_close": shipped.tcp_close,
            "job_network": shipped.job_network, "job_subnet": shipped.job_subnet,
            "overlay_subnet": shipped.overlay_subnet,
            "overlay_ids": "{}-{}".format(*shipped.overlay_ids),
            "compress": shipped.compress, "direct_io": shipped.direct_io,
            "full_every": shipped.full_every,
            "gpu_library": shipped.gpu_library,
            "gpu_lock_timeout": shipped.gpu_lock_timeout,
            "hooks": shipped.hooks} == config.DEFAULTS
