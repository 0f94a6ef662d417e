"""A real multi-node Slurm cluster on one machine, for tests.

slurmctld runs in the root network namespace on a private bridge; every compute node is a
slurmd in its own network namespace (veth into the bridge), UTS namespace (hostname node1, …)
and mount namespace (only /etc/hosts bind-mounted). A private munged signs the credentials.
Everything the cluster writes lives under one state directory.

    python3 -m testbed.cluster up [--nodes N] [--dir DIR] [--conf LINE ...]
    python3 -m testbed.cluster status [--dir DIR]
    python3 -m testbed.cluster down [--dir DIR]

Only one test bed can be up per machine at a time: the bridge, subnet and namespace names are
fixed. Needs root and the Debian packages from testbed/install-deps.sh.
"""

from __future__ import annotations

import argparse
import glob
import grp
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

DEFAULT_DIR = Path(os.environ.get("HPCCR_TESTBED_DIR", "/tmp/hpccr-testbed"))
DEFAULT_USER = "hpcuser"
SHARED_GROUP = "users"  # Debian's, gid 100
PREFERRED_UID = 1000

# The subnet exists only on this machine, on the bridge below; nodes have no default route.
SUBNET = "10.213.7"
CONTROLLER_ADDR = f"{SUBNET}.1"
NODE_ADDR_BASE = 10  # node<i> gets SUBNET.<base + i>
MAX_NODES = 200
BRIDGE = "hpccr-br0"
NS_PREFIX = "hpccr-"  # network namespace and host-side veth of node<i>: hpccr-node<i>
BRIDGE_ALIAS_PREFIX = "hpccr-testbed:"  # the bridge's alias names the owning state dir
CONTROLLER_HOST = "ctl"
CTLD_PORT = 26817
SLURMD_PORT = 26818

SBIN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DAEMONS = ("munged", "slurmctld", "slurmd")
KEEP_ON_DOWN = ("log",)  # state-dir entries kept after down, for post-mortems
CGROUP_GLOB = "/sys/fs/cgroup/*/slurm_node[0-9]*"
# cgroups the tests and `hpccr check` make for themselves (tests/test_agent.py, engine/check.py)
TEST_CGROUP_GLOBS = ("/sys/fs/cgroup/*/hpccr-test-*", "/sys/fs/cgroup/*/slurm_hpccrtest",
                     "/sys/fs/cgroup/*/hpccr-check-*")
MULTI_KEYS = {"nodename", "partitionname", "nodeset", "downnodes", "include"}


class ClusterError(RuntimeError):
    """The test cluster could not be brought up, queried or torn down."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN)


def missing_binaries() -> list[str]:
    """Programs the test bed needs that are not installed."""
    need = ["slurmctld", "slurmd", "slurmstepd", "sbatch", "scontrol", "sinfo", "squeue",
            "scancel", "srun", "munged", "mungekey", "ip", "nsenter", "unshare", "runuser",
            "useradd"]
    return [n for n in need if _which(n) is None]


def _run(cmd: Sequence[str], *, check: bool = True, timeout: float = 30,
         **kw) -> subprocess.CompletedProcess:
    exe = _which(cmd[0]) or cmd[0]
    try:
        proc = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True,
                              timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise ClusterError(f"timed out after {timeout}s: {shlex.join(cmd)}") from e
    if check and proc.returncode != 0:
        raise ClusterError(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n"
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


# --- processes ---------------------------------------------------------------------------------

def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(comm, state) of a process, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]


def _alive(pid: int, name: str | None = None) -> bool:
    # pid 1 here does not reap orphans: a zombie counts as dead.
    st = _proc_stat(pid)
    return st is not None and st[1] not in "ZX" and (name is None or st[0] == name)


def _comm(pid: int) -> str | None:
    st = _proc_stat(pid)
    return st[0] if st else None


def _pidfile_pid(path: Path, name: str) -> int | None:
    """The pid in a pid file, if that process is alive and is called name."""
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _alive(pid, name) else None


def _kill(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if _alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _stop(pids: Sequence[int], timeout: float = 5) -> None:
    """SIGTERM, then SIGKILL what is still there after timeout."""
    _kill(pids, signal.SIGTERM)
    left = _wait_gone(pids, timeout)
    _kill(left, signal.SIGKILL)
    _wait_gone(left, 5)


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _netns_pids(ns_path: str) -> list[int]:
    """Live processes whose network namespace is the one bound at ns_path."""
    try:
        st = os.stat(ns_path)
    except OSError:
        return []
    pids = []
    for pid in _all_pids():
        try:
            pst = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            continue
        if (pst.st_dev, pst.st_ino) == (st.st_dev, st.st_ino) and _alive(pid):
            pids.append(pid)
    return pids


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


# --- network -----------------------------------------------------------------------------------

def _link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def _bridge_owner() -> str | None:
    """State dir of the test bed that owns the bridge ('' if unknown), None without bridge."""
    if not _link_exists(BRIDGE):
        return None
    info = json.loads(_run(["ip", "-j", "link", "show", BRIDGE]).stdout or "[{}]")
    alias = info[0].get("ifalias", "") if info else ""
    return alias[len(BRIDGE_ALIAS_PREFIX):] if alias.startswith(BRIDGE_ALIAS_PREFIX) else ""


def _our_netns() -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(f"/run/netns/{NS_PREFIX}node*"))


def _our_links() -> list[str]:
    """The bridge and the host ends of the nodes' veths."""
    return sorted(os.path.basename(p) for p in glob.glob(f"/sys/class/net/{NS_PREFIX}*"))


# --- cgroups -----------------------------------------------------------------------------------

def _cgroup_dirs() -> list[str]:
    return sorted(glob.glob(CGROUP_GLOB))


def _remove_cgroups(timeout: float = 10) -> list[str]:
    """Kill what is left in the nodes' cgroups and rmdir them innermost first.

    Returns the directories that could not be removed.
    """
    return [left for top in _cgroup_dirs() for left in _remove_cgroup_tree(top, timeout)]


def _remove_cgroup_tree(top: str, timeout: float = 10) -> list[str]:
    """Kill what is in the cgroup `top` and below, and rmdir them innermost first; returns the
    directories that could not be removed."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for path, _dirs, files in os.walk(top, topdown=False):
            for f in ("cgroup.procs", "tasks"):
                if f in files:
                    try:
                        pids = [int(x) for x in Path(path, f).read_text().split()]
                    except OSError:
                        pids = []
                    _kill(pids, signal.SIGKILL)
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError:
                left.append(path)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


# --- the job user ------------------------------------------------------------------------------

def ensure_user(name: str = DEFAULT_USER) -> pwd.struct_passwd:
    """Create the job user (uid 1000 if free) with a home directory if it is missing, in the
    supplementary group SHARED_GROUP (what a project group gives its members, tests check)."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        pass
    else:
        if name not in grp.getgrnam(SHARED_GROUP).gr_mem:
            _run(["usermod", "--append", "--groups", SHARED_GROUP, name])
        return pw
    cmd = ["useradd", "--create-home", "--shell", "/bin/bash", "--user-group",
           "--groups", SHARED_GROUP]
    try:
        pwd.getpwuid(PREFERRED_UID)
    except KeyError:
        cmd += ["--uid", str(PREFERRED_UID)]
    _run([*cmd, name])
    return pwd.getpwnam(name)


def remove_user(name: str = DEFAULT_USER) -> None:
    """Kill the job user's processes and remove the user, its group and its home directory."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return
    deadline = time.monotonic() + 10
    while mine := [p for p in _all_pids() if _uid_of(p) == uid]:
        if time.monotonic() > deadline:
            raise ClusterError(f"processes of {name} will not die: {mine}")
        _kill(mine, signal.SIGKILL)
        time.sleep(0.05)
    _run(["userdel", "--remove", name], check=False)  # exit 12: no home to remove
    if name in {p.pw_name for p in pwd.getpwall()}:
        raise ClusterError(f"userdel {name} failed")


def _uid_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def purge(state_dir: Path = DEFAULT_DIR) -> list[str]:
    """Remove every trace a test bed or a test run can leave on the machine, whatever state it
    was left in: daemons, node namespaces, links, cgroups, the state directory and the job
    user.  What a later run must not find.  Returns what could not be removed."""
    owner = _bridge_owner()
    dirs = {Path(state_dir)} | ({Path(owner)} if owner else set())
    for d in dirs:
        cluster = Cluster(d, nodes=_nodes_from_conf(d / "etc" / "slurm.conf"))
        try:
            cluster.down()
        except ClusterError:
            pass  # what down could not remove is removed below, or reported
    for ns in _our_netns():
        _stop(_netns_pids(f"/run/netns/{ns}"), timeout=2)
        _run(["ip", "netns", "del", ns], check=False)
    for link in _our_links():
        _run(["ip", "link", "del", link], check=False)
    left = _remove_cgroups()
    for pattern in TEST_CGROUP_GLOBS:
        for path in glob.glob(pattern):
            left += _remove_cgroup_tree(path)
    remove_user()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    left += [f"netns {ns}" for ns in _our_netns()] + [f"link {x}" for x in _our_links()]
    left += [f"directory {d}" for d in dirs if d.exists()]
    return left


# --- the cluster -------------------------------------------------------------------------------

def _conf_key(line: str) -> str | None:
    m = re.match(r"\s*([A-Za-z][A-Za-z0-9_]*)\s*=", line)
    return m.group(1).lower() if m else None


def _parse_job(text: str) -> dict[str, str]:
    """Parse one line of `scontrol show job -o` into {Key: Value}."""
    keys = list(re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=", text))
    out = {}
    for i, m in enumerate(keys):
        end = keys[i + 1].start() if i + 1 < len(keys) else len(text)
        out[m.group(1)] = text[m.end():end].strip()
    return out


class Cluster:
    """A Slurm test cluster whose state lives in `dir`.

    `extra_conf` lines are added to slurm.conf; a line whose key is already set (e.g.
    `KillWait=60`) replaces the default, others (Prolog=, Epilog=, PlugStackConfig=,
    extra PartitionName= lines, …) are appended.
    """

    def __init__(self, dir: str | os.PathLike = DEFAULT_DIR, nodes: int = 2,
                 extra_conf: Sequence[str] = (), user: str = DEFAULT_USER):
        if not 1 <= nodes <= MAX_NODES:
            raise ClusterError(f"nodes must be 1..{MAX_NODES}, not {nodes}")
        self.dir = Path(dir).absolute()
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.extra_conf = list(extra_conf)
        self.user = user

    # paths
    @property
    def conf_path(self) -> Path:
        return self.dir / "etc" / "slurm.conf"

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"

    @property
    def job_dir(self) -> Path:
        """World-writable (sticky) directory for job scripts and output; the default cwd."""
        return self.dir / "jobs"

    @property
    def munge_socket(self) -> Path:
        return self.dir / "munge" / "munge.socket"

    def node_addr(self, node: str) -> str:
        return f"{SUBNET}.{NODE_ADDR_BASE + self.nodes.index(node) + 1}"

    def netns(self, node: str) -> str:
        """Path of the node's network namespace (for `nsenter --net=`)."""
        return f"/run/netns/{NS_PREFIX}{node}"

    def _pidfile(self, daemon: str, node: str | None = None) -> Path:
        if daemon == "munged":
            return self.dir / "munge" / "munged.pid"
        return self.dir / "run" / (f"slurmd.{node}.pid" if node else "slurmctld.pid")

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands (SLURM_CONF set, inherited SLURM_* dropped)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf_path)
        env["PATH"] = env.get("PATH", "") + ":" + SBIN
        return env

    # configuration
    def slurm_conf(self) -> str:
        d = self.dir
        settings = {
            "ClusterName": "hpccr",
            "SlurmctldHost": f"{CONTROLLER_HOST}({CONTROLLER_ADDR})",
            "SlurmctldPort": str(CTLD_PORT),
            "SlurmdPort": str(SLURMD_PORT),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket},cred_expire=10",
            "StateSaveLocation": f"{d}/spool/ctld",
            "SlurmdSpoolDir": f"{d}/spool/%n",
            "SlurmctldPidFile": str(self._pidfile("slurmctld")),
            "SlurmdPidFile": f"{d}/run/slurmd.%n.pid",
            "SlurmctldLogFile": f"{d}/log/slurmctld.log",
            "SlurmdLogFile": f"{d}/log/slurmd.%n.log",
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "TmpFS": f"{d}/tmp/%n",
            "ProctrackType": "proctrack/cgroup",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "SwitchType": "switch/none",
            "MpiDefault": "none",
            "SchedulerType": "sched/backfill",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "PreemptType": "preempt/partition_prio",
            "PreemptMode": "REQUEUE",
            "JobRequeue": "1",
            "ReturnToService": "2",
            "SlurmdParameters": "config_overrides",
            "MinJobAge": "30",
            "KillWait": "30",
            "InactiveLimit": "0",
            "MailProg": "/bin/true",
        }
        keys = {k.lower(): k for k in settings}
        appended = []
        for line in self.extra_conf:
            key = _conf_key(line)
            if key in keys and key not in MULTI_KEYS:
                settings[keys[key]] = line.split("=", 1)[1].strip()
            else:
                appended.append(line.strip())
        cpus = os.cpu_count() or 1
        lines = ["# Generated by testbed/cluster.py; changes are lost on the next up."]
        lines += [f"{k}={v}" for k, v in settings.items()]
        lines += [f"NodeName={n} NodeHostname={n} NodeAddr={self.node_addr(n)} CPUs={cpus} "
                  "State=UNKNOWN" for n in self.nodes]
        lines += ["PartitionName=batch Nodes=ALL Default=YES PriorityTier=1 MaxTime=INFINITE "
                  "State=UP",
                  "PartitionName=urgent Nodes=ALL PriorityTier=10 MaxTime=INFINITE State=UP"]
        if appended:
            lines += ["# extra_conf", *appended]
        return "\n".join(lines) + "\n"

    @staticmethod
    def cgroup_conf() -> str:
        return ("CgroupPlugin=autodetect\nConstrainCores=no\nConstrainRAMSpace=no\n"
                "ConstrainSwapSpace=no\nConstrainDevices=no\n")

    def hosts(self) -> str:
        lines = ["127.0.0.1 localhost", f"{CONTROLLER_ADDR} {CONTROLLER_HOST}"]
        lines += [f"{self.node_addr(n)} {n}" for n in self.nodes]
        return "\n".join(lines) + "\n"

    # state
    def daemons(self) -> dict[str, int | None]:
        """{'munged': pid|None, 'slurmctld': …, 'slurmd@node1': …} for this cluster's nodes."""
        out: dict[str, int | None] = {
            "munged": _pidfile_pid(self._pidfile("munged"), "munged"),
            "slurmctld": _pidfile_pid(self._pidfile("slurmctld"), "slurmctld"),
        }
        for n in self.nodes:
            out[f"slurmd@{n}"] = _pidfile_pid(self._pidfile("slurmd", n), "slurmd")
        return out

    def is_up(self) -> bool:
        return all(self.daemons().values())

    def _check_root_and_owner(self) -> None:
        if os.geteuid() != 0:
            raise ClusterError("the test cluster needs root (namespaces, bridge, cgroups)")
        owner = _bridge_owner()
        if owner and owner != str(self.dir):
            raise ClusterError(f"the test bed in {owner} is up (it owns {BRIDGE}); run: "
                               f"python3 -m testbed.cluster down --dir {owner}")

    # bring-up
    def up(self, timeout: float = 60) -> Cluster:
        """Start the cluster (what is not running yet) and wait until every node is idle."""
        self._check_root_and_owner()
        missing = missing_binaries()
        if missing:
            raise ClusterError(f"missing programs: {' '.join(missing)}; "
                               "run testbed/install-deps.sh")
        conf = self.slurm_conf()
        running = {k: v for k, v in self.daemons().items() if v}
        if running:
            old = self.conf_path.read_text() if self.conf_path.exists() else ""
            if old != conf:
                raise ClusterError(f"a cluster with another configuration is running in "
                                   f"{self.dir}; run down first")
        else:
            self._wipe()  # fresh start: no stale jobs, pid files or logs
        self._write_files(conf)
        self.ensure_user()
        self._setup_network()
        self._start_daemons()
        self.wait_ready(timeout)
        return self

    def ensure_user(self) -> pwd.struct_passwd:
        return ensure_user(self.user)

    def _write_files(self, conf: str) -> None:
        d = self.dir
        for sub in ("etc", "munge", "spool/ctld", "run", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("jobs", *(f"tmp/{n}" for n in self.nodes)):
            (d / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(d / sub, 0o1777)
        for n in self.nodes:
            (d / "spool" / n).mkdir(exist_ok=True)
        for sub in ("", "etc", "munge", "tmp"):
            os.chmod(d / sub, 0o755)  # clients as any user read slurm.conf, use the socket
        self.conf_path.write_text(conf)
        (d / "etc" / "cgroup.conf").write_text(self.cgroup_conf())
        (d / "etc" / "hosts").write_text(self.hosts())
        key = d / "munge" / "munge.key"
        if not key.exists():
            _run(["mungekey", "--create", "--keyfile", str(key)])
        os.chmod(key, 0o600)

    def _setup_network(self) -> None:
        if not _link_exists(BRIDGE):
            _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
            _run(["ip", "addr", "add", f"{CONTROLLER_ADDR}/24", "dev", BRIDGE])
        _run(["ip", "link", "set", BRIDGE, "alias", BRIDGE_ALIAS_PREFIX + str(self.dir)])
        _run(["ip", "link", "set", BRIDGE, "up"])
        for n in self.nodes:
            ns = NS_PREFIX + n
            if not os.path.exists(self.netns(n)):
                _run(["ip", "netns", "add", ns])
            if not _link_exists(ns):
                _run(["ip", "link", "add", ns, "type", "veth", "peer", "name", "eth0",
                      "netns", ns])
                _run(["ip", "-n", ns, "addr", "add", f"{self.node_addr(n)}/24", "dev", "eth0"])
            _run(["ip", "link", "set", ns, "master", BRIDGE, "up"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _launch(self, name: str, cmd: Sequence[str]) -> None:
        """Run a self-daemonizing command; its early output goes to log/<name>.out."""
        with open(self.log_dir / f"{name}.out", "a") as out:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                  env=self.env, timeout=30, start_new_session=True)
        if proc.returncode != 0:
            raise ClusterError(f"{name} failed to start (exit {proc.returncode})\n"
                               + self.log_tails())

    def _start_daemons(self) -> None:
        d = self.dir
        running = self.daemons()
        if not running["munged"]:
            self._launch("munged", [
                _which("munged"), f"--socket={self.munge_socket}",
                f"--key-file={d}/munge/munge.key", f"--log-file={d}/log/munged.log",
                f"--pid-file={self._pidfile('munged')}", f"--seed-file={d}/munge/munged.seed"])
        if not running["slurmctld"]:
            # Own UTS namespace: slurmctld insists its hostname is the SlurmctldHost name.
            ctld = shlex.join([_which("slurmctld"), "-f", str(self.conf_path)])
            self._launch("slurmctld", [_which("unshare"), "--uts", "--", "/bin/sh", "-c",
                                       f"hostname {CONTROLLER_HOST} && exec {ctld}"])
        hosts = d / "etc" / "hosts"
        for n in self.nodes:
            if running[f"slurmd@{n}"]:
                continue
            slurmd = shlex.join([_which("slurmd"), "-N", n, "-f", str(self.conf_path)])
            script = (f"hostname {n} && mount --bind {shlex.quote(str(hosts))} /etc/hosts "
                      f"&& exec {slurmd}")
            # Not `ip netns exec`: it remounts /sys and the node would see no cgroups.
            self._launch(f"slurmd.{n}", [_which("nsenter"), f"--net={self.netns(n)}", "--",
                                         _which("unshare"), "--uts", "--mount", "--",
                                         "/bin/sh", "-c", script])

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until every daemon runs and every node is idle in sinfo."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            dead = [k for k, v in self.daemons().items() if not v]
            if not dead:
                proc = self.client("sinfo", "-h", "-N", "-o", "%N %T", check=False)
                states = dict(line.split() for line in proc.stdout.splitlines()
                              if len(line.split()) == 2)
                if all(states.get(n) == "idle" for n in self.nodes):
                    return
            time.sleep(0.2)
        raise ClusterError(f"cluster in {self.dir} not ready after {timeout}s: "
                           f"daemons not running: {dead or 'none'}; node states: {states}\n"
                           + self.log_tails())

    def restart(self, daemon: str, node: str | None = None, timeout: float = 60) -> None:
        """Restart slurmctld, or the slurmd of `node`, as an operator would: SIGTERM (its
        jobs' steps run on), then the same command again; returns once it serves again
        (slurmctld answers `scontrol ping`; a slurmd has registered with the controller,
        its node's SlurmdStartTime changed)."""
        key = f"slurmd@{node}" if daemon == "slurmd" else daemon
        if key not in self.daemons():
            raise ClusterError(f"no daemon {key} in this cluster")
        started = self._node_field(node, "SlurmdStartTime") if node else None
        pid = self.daemons()[key]
        if pid:
            _stop([pid], timeout=30)
        self._start_daemons()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if daemon == "slurmd":
                if self._node_field(node, "SlurmdStartTime") not in (None, started):
                    return
            elif " is UP" in self.client("scontrol", "ping", check=False).stdout:
                return
            time.sleep(0.2)
        raise ClusterError(f"{key} does not serve again after {timeout}s\n" + self.log_tails())

    def _node_field(self, node: str, field: str) -> str | None:
        proc = self.client("scontrol", "show", "node", "-o", node, check=False)
        found = re.search(rf"\b{field}=(\S+)", proc.stdout)
        return found.group(1) if found else None

    def log_tails(self, lines: int = 15) -> str:
        out = [f"logs in {self.log_dir}:"]
        for path in sorted(self.log_dir.glob("*")):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            if text:
                out += [f"--- {path.name}", *text]
        return "\n".join(out)

    # tear-down
    def down(self) -> None:
        """Stop everything the test bed started and remove its state (logs are kept).

        Safe to run when nothing (or only part of the cluster) is running.
        """
        self._check_root_and_owner()
        running = self.daemons()
        if running["slurmctld"] and running["munged"]:
            self._cancel_all()
        # node daemons, then whatever is left in the node namespaces (slurmstepd, job tasks)
        pidfiles = (self.dir / "run").glob("slurmd.*.pid")
        _stop([p for p in (_pidfile_pid(f, "slurmd") for f in pidfiles) if p])
        netns = _our_netns()
        for ns in netns:
            _stop(_netns_pids(f"/run/netns/{ns}"), timeout=2)
        for daemon in ("slurmctld", "munged"):
            pid = _pidfile_pid(self._pidfile(daemon), daemon)
            if pid:
                _stop([pid])
        # Daemons of this state dir whose pid file was lost.
        _stop(self._own_processes(DAEMONS))
        for ns in netns:
            _run(["ip", "netns", "del", ns], check=False)
        for link in _our_links():
            _run(["ip", "link", "del", link], check=False)
        cgroups_left = _remove_cgroups()
        self._wipe(keep=KEEP_ON_DOWN)
        left = self.leftovers()
        if left or cgroups_left:
            raise ClusterError("tear-down left: " + "; ".join(left + cgroups_left))

    def _cancel_all(self) -> None:
        proc = self.client("squeue", "-h", "-o", "%i", check=False, timeout=10)
        jobs = proc.stdout.split()
        if not jobs:
            return
        self.client("scancel", *jobs, check=False, timeout=10)
        # Give slurmstepd a moment to clean up; whatever remains is killed anyway.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if not any(_comm(p) == "slurmstepd" and _alive(p) for p in _all_pids()):
                return
            time.sleep(0.1)

    def _wipe(self, keep: Sequence[str] = ()) -> None:
        """Remove the state directory's contents except the entries named in keep."""
        if not self.dir.exists():
            return
        for entry in self.dir.iterdir():
            if entry.name in keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _own_processes(self, names: Sequence[str]) -> list[int]:
        """Live processes called one of names whose command line mentions the state dir."""
        return [p for p in _all_pids()
                if _comm(p) in names and _alive(p) and str(self.dir) in _cmdline(p)]

    def leftovers(self) -> list[str]:
        """What of a test bed is still on the machine (empty after a clean down)."""
        left = [f"process {p} ({_comm(p)})" for p in self._own_processes(DAEMONS)]
        left += [f"netns {ns}" for ns in _our_netns()]
        left += [f"link {link}" for link in _our_links()]
        left += [f"cgroup {c}" for c in _cgroup_dirs()]
        return left

    # client commands
    def client(self, *cmd: str, user: str | None = None, input: str | None = None,
               cwd: str | os.PathLike | None = None, check: bool = True,
               timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm client command (as `user` via runuser when given)."""
        argv = list(cmd)
        if user is not None and user != "root":
            argv = ["runuser", "-u", user, "--", *argv]
        try:
            proc = subprocess.run([_which(argv[0]) or argv[0], *argv[1:]], input=input,
                                  capture_output=True, text=True, env=self.env,
                                  cwd=cwd or self.job_dir, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise ClusterError(f"timed out after {timeout}s: {shlex.join(argv)}") from e
        if check and proc.returncode != 0:
            raise ClusterError(f"{shlex.join(argv)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()}")
        return proc

    def scontrol(self, *args: str) -> str:
        return self.client("scontrol", *args).stdout

    def squeue(self, *args: str) -> str:
        return self.client("squeue", *args).stdout

    def sinfo(self, *args: str) -> str:
        return self.client("sinfo", *args).stdout

    def sbatch(self, script: str | os.PathLike | None, *args: str,
               user: str | None = DEFAULT_USER, cwd: str | os.PathLike | None = None) -> int:
        """Submit a job; return its id.

        `script` is a path (os.PathLike, or a str without newline not starting with '#!'),
        the script's text (fed on stdin), or None with `--wrap` in args. `args` are sbatch
        options. The job runs as `user` (root when None), in `cwd` (default job_dir).
        """
        text = None
        argv = ["sbatch", "--parsable", *args]
        if isinstance(script, str) and ("\n" in script or script.startswith("#!")):
            text = script
        elif script is not None:
            argv.append(str(script))
        out = self.client(*argv, user=user, input=text, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, jobid: int) -> dict[str, str] | None:
        """`scontrol show job -o` as a dict, None once the job is unknown (purged)."""
        proc = self.client("scontrol", "show", "job", "-o", str(jobid), check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            if "Invalid job id" in proc.stderr:
                return None
            raise ClusterError(f"scontrol show job {jobid}: {proc.stderr.strip()}")
        return _parse_job(proc.stdout.splitlines()[0])

    def job_state(self, jobid: int) -> str | None:
        info = self.job(jobid)
        return info.get("JobState") if info else None

    def wait_state(self, jobid: int, states: str | Iterable[str],
                   timeout: float = 60) -> dict[str, str]:
        """Wait until the job is in one of `states`; return its `scontrol show job` dict."""
        want = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(jobid) or {}
            if info.get("JobState") in want:
                return info
            time.sleep(0.2)
        last = {k: info.get(k) for k in ("JobState", "Reason", "NodeList")}
        raise ClusterError(f"job {jobid} not in {sorted(want)} after {timeout}s; last: {last}\n"
                           + self.log_tails())


# --- command line ------------------------------------------------------------------------------

def _status(cluster: Cluster) -> int:
    daemons = cluster.daemons()
    for name, pid in daemons.items():
        print(f"{name:16} {'running, pid ' + str(pid) if pid else 'not running'}")
    if daemons["slurmctld"] and daemons["munged"]:
        print(cluster.client("sinfo", check=False).stdout, end="")
    print(f"logs: {cluster.log_dir}")
    up = cluster.is_up()
    if up:
        print(f"export SLURM_CONF={cluster.conf_path}")
    return 0 if up else 1


def _nodes_from_conf(conf: Path) -> int:
    try:
        return max(1, len(re.findall(r"^NodeName=", conf.read_text(), re.M)))
    except OSError:
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m testbed.cluster",
                                     description="Slurm test cluster on one machine")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("up", "start the cluster and wait until all nodes are idle"),
                        ("down", "stop everything and remove the state (logs are kept)"),
                        ("status", "show daemons and nodes; exit 0 only when fully up"),
                        ("purge", "remove everything test beds and test runs leave on the "
                                  "machine, the job user included"),
                        ("user", "create the job user if it is missing")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                       help=f"state directory (default {DEFAULT_DIR})")
        if name == "up":
            p.add_argument("--nodes", type=int, default=2, help="compute nodes (default 2)")
            p.add_argument("--conf", action="append", default=[], metavar="LINE",
                           help="extra slurm.conf line (repeatable)")
            p.add_argument("--timeout", type=float, default=60,
                           help="seconds to wait for idle nodes (default 60)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "user":
            print(f"job user: {ensure_user().pw_name}")
            return 0
        if args.cmd == "purge":
            left = purge(args.dir)
            if left:
                raise ClusterError("purge left: " + "; ".join(left))
            print("test bed purged")
            return 0
        if args.cmd == "up":
            cluster = Cluster(args.dir, nodes=args.nodes, extra_conf=args.conf).up(args.timeout)
            print(f"cluster up: {' '.join(cluster.nodes)} (controller {CONTROLLER_ADDR}) "
                  f"in {cluster.dir}")
            print(f"logs: {cluster.log_dir}")
            print(f"export SLURM_CONF={cluster.conf_path}")
            return 0
        cluster = Cluster(args.dir, nodes=_nodes_from_conf(args.dir / "etc" / "slurm.conf"))
        if args.cmd == "down":
            cluster.down()
            print(f"cluster down; logs kept in {cluster.log_dir}")
            return 0
        return _status(cluster)
    except ClusterError as e:
        print(f"testbed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
