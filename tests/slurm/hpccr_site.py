"""A test site on the real test cluster: hpccr's prolog, epilog and SPANK plugin configured,
a site configuration of its own, and helpers for the tests that submit jobs to it (the `site`
fixture is in conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "hpccr" / "slurm" / "spank_hpccr.so"
GRACE = 77  # the site's grace, distinct from the default


@dataclass
class Site:
    cluster: Cluster
    dir: Path
    config: Path
    base: Path  # checkpoint_base
    log: Path  # the prolog/epilog site log
    user_hpccr: str  # an hpccr that hpcuser can run

    def env(self, **extra: str) -> list[str]:
        """`env VAR=… ` prefix for a client command: the site's configuration and more."""
        values = {"HPCCR_CONFIG": str(self.config), **extra}
        return ["env", *(f"{k}={v}" for k, v in values.items())]

    def submit(self, *args: str, user: str | None = "hpcuser", **env: str) -> int:
        if user is not None:  # job.sh runs this hpccr (root's is the checkout's own)
            env.setdefault("HPCCR_BIN", self.user_hpccr)
        out = self.cluster.client(*self.env(**env), "sbatch", "--parsable", *args,
                                  user=user).stdout
        return int(out.strip().split(";")[0])

    def job_dir(self, user: str, job: int) -> Path:
        return self.base / user / str(job)


def _executable_by(user: str, argv: list[str]) -> bool:
    run = subprocess.run(["runuser", "-u", user, "--", *argv], capture_output=True)
    return run.returncode == 0


def _user_hpccr(site_dir: Path) -> str:
    """An hpccr hpcuser can run.  The checkout's own if it can; otherwise (its venv's Python
    lives under a directory only root may enter, like a pyenv in /root) a venv made from the
    system's Python that imports the checkout's packages — same code, another interpreter."""
    own = str(REPO / ".venv" / "bin" / "hpccr")
    if _executable_by("hpcuser", [own, "--version"]):
        return own
    system = Path("/usr/bin/python3")
    if not system.exists() or not (REPO / ".venv").exists():
        pytest.skip("no Python that hpcuser can run hpccr with")
    venv = site_dir / "uservenv"
    subprocess.run([str(system), "-m", "venv", "--without-pip", str(venv)], check=True)
    site_packages = next((REPO / ".venv" / "lib").glob("python3*/site-packages"))
    own_site = next((venv / "lib").glob("python3*/site-packages"))
    (own_site / "hpccr-checkout.pth").write_text(
        f"import site; site.addsitedir({str(site_packages)!r})\n")
    hpccr = venv / "bin" / "hpccr"
    hpccr.write_text(f"#!{venv}/bin/python\nimport sys\nfrom hpccr.cli import main\n"
                     "sys.exit(main())\n")
    hpccr.chmod(0o755)
    if not _executable_by("hpcuser", [str(hpccr), "--version"]):
        pytest.skip(f"hpcuser cannot run hpccr from {REPO} either")
    return str(hpccr)


def wait_for(predicate, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def log_lines(site: Site, job: int) -> list[str]:
    if not site.log.exists():
        return []
    return [line for line in site.log.read_text().splitlines() if f": job {job}: " in line]


def ended(site: Site, job: int) -> str:
    """The epilog's line for the job in the site log, once it is there."""
    return wait_for(lambda: next((line for line in log_lines(site, job) if " ended: " in line),
                                 None), what=f"the epilog of job {job}")


def write_script(site: Site, name: str, text: str) -> Path:
    path = site.cluster.job_dir / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def make_site(default: Cluster, nodes: int | None = None):
    """Bring the site's cluster up in place of `default` (with as many nodes, or `nodes`);
    yields the Site, then gives `default` back."""
    if not PLUGIN.exists():
        reason = f"{PLUGIN.name} not built (libslurm-dev missing when hpccr was installed)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    # Not in the cluster's state directory (`up` wipes it); readable by hpcuser.
    site_dir = Path(tempfile.mkdtemp(prefix="hpccr-site-"))
    site_dir.chmod(0o755)
    try:
        user_hpccr = _user_hpccr(site_dir)
    except BaseException:
        shutil.rmtree(site_dir)
        raise
    config = site_dir / "hpccr.toml"
    base, log_dir = site_dir / "checkpoints", site_dir / "log"
    config.write_text(f'checkpoint_base = "{base}"\nlog_dir = "{log_dir}"\ngrace = {GRACE}\n'
                      f'run_dir = "{site_dir / "run"}"\n')
    for script in ("prolog", "epilog"):  # the shipped wrappers, with this site's config
        wrapper = site_dir / script
        wrapper.write_text(f"#!/bin/sh\nHPCCR_CONFIG={config} exec {REPO}/etc/slurm/{script}.sh\n")
        wrapper.chmod(0o755)
    plugstack = site_dir / "plugstack.conf"
    plugstack.write_text(f"required {PLUGIN} job={REPO}/etc/slurm/job.sh\n")
    default.down()
    cluster = Cluster(default.dir, nodes=nodes or len(default.nodes), extra_conf=[
        f"Prolog={site_dir}/prolog", f"Epilog={site_dir}/epilog", "PrologFlags=Alloc",
        f"PlugStackConfig={plugstack}", "JobRequeue=0"]).up()
    try:
        yield Site(cluster, site_dir, config, base, log_dir / "slurm.log", user_hpccr)
    finally:
        cluster.down()
        shutil.rmtree(site_dir)
        default.up()  # for any later test of the session


