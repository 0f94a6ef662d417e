"""Site configuration: one small TOML file, overridable by environment variables.

The file is the first of `$HPCCR_CONFIG`, `/etc/hpccr/hpccr.toml`, or none (the built-in
defaults below, which etc/hpccr.toml documents key by key).  A file sets any subset of the keys;
the others keep their defaults.  Then `HPCCR_<KEY>` overrides a key (`HPCCR_KEEP=3`,
`HPCCR_CHECKPOINT_BASE=/scratch/ckpt`, `HPCCR_HOOKS_JOB_START=site.hooks:on_start,other:fn`).
Anything wrong raises ConfigError with one line naming the file or variable.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from hpccr.errors import HpccrError

SITE_FILE = Path("/etc/hpccr/hpccr.toml")
HOOK_EVENTS = ("job_start", "before_checkpoint", "after_checkpoint", "before_restore",
               "after_restore", "job_end")
DEFAULTS = {
    "checkpoint_base": "/var/spool/hpccr/checkpoints",
    "keep": 2,
    "grace": 120,
    "log_dir": "/var/log/hpccr",
    "run_dir": "/run/hpccr",
    "tcp_close": False,
    "job_network": "own",
    "job_subnet": "10.199.0.0/16",
    "overlay_subnet": "10.198.0.0/16",
    "overlay_ids": "4096-1048575",
    "compress": False,
    "direct_io": True,
    "full_every": 8,
    "gpu_library": "libcuda.so.1",
    "gpu_lock_timeout": 60,
    "hooks": {event: [] for event in HOOK_EVENTS},
}
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
NETWORKS = ("own", "host")  # a job's network: its own namespace, or the node's
MAX_GRACE = 65535  # Slurm's --signal=…@<time> limit
MAX_FULL_EVERY = 256  # the longest chain of incremental images a restore follows
MAX_GPU_LOCK_TIMEOUT = 4_000_000  # seconds: the driver takes milliseconds in 32 bits


class ConfigError(HpccrError):
    """The site configuration file or an HPCCR_* override is invalid."""


@dataclass(frozen=True)
class Config:
    checkpoint_base: Path
    keep: int
    grace: int
    log_dir: Path
    run_dir: Path
    tcp_close: bool
    job_network: str  # "own" or "host"
    job_subnet: str
    overlay_subnet: str  # a /24 of it per job on several nodes
    overlay_ids: tuple[int, int]  # the VXLAN ids those jobs take, first and last
    hooks: dict[str, list[str]]
    source: str  # the file read, or "built-in defaults"
    compress: bool  # checkpoints' pages compressed with zstd
    direct_io: bool  # uncompressed pages written with O_DIRECT, past the page cache
    full_every: int  # periodic checkpoints: every N-th is full, the others incremental
    gpu_library: str  # NVIDIA's libcuda (a name or a path), loaded for GPU jobs only
    gpu_lock_timeout: int  # seconds a GPU process may take to lock before a dump gives up

    def job_dir(self, user: str, jobid: str | int) -> Path:
        """The checkpoint series directory of one Slurm job: <checkpoint_base>/<user>/<jobid>."""
        return self.checkpoint_base / user / str(jobid)


def config_file(environ=os.environ) -> Path | None:
    if environ.get("HPCCR_CONFIG"):
        return Path(environ["HPCCR_CONFIG"])
    return SITE_FILE if SITE_FILE.exists() else None


def load(environ=os.environ) -> Config:
    """The effective configuration: defaults < file < HPCCR_* environment variables."""
    path = config_file(environ)
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS.items()}
    origin = dict.fromkeys(DEFAULTS, "built-in defaults")  # who set each key, for messages
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        _merge(values, origin, data, str(path))
    _merge_environment(values, origin, environ)
    return _validate(values, origin, str(path) if path else "built-in defaults")


def _merge(values: dict, origin: dict, data: dict, where: str) -> None:
    for key, value in data.items():
        if key not in DEFAULTS:
            raise ConfigError(f"{where}: unknown setting '{key}' (known: {', '.join(DEFAULTS)})")
        if key == "hooks":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: 'hooks' must be a table of event = [\"module:fn\"]")
            for event, specs in value.items():
                if event not in HOOK_EVENTS:
                    raise ConfigError(f"{where}: unknown hook event '{event}' "
                                      f"(known: {', '.join(HOOK_EVENTS)})")
                if not (isinstance(specs, list) and all(isinstance(s, str) for s in specs)):
                    raise ConfigError(f"{where}: hooks.{event} must be a list of "
                                      "\"module:function\" strings")
                values["hooks"][event] = specs
                origin[f"hooks.{event}"] = where
        elif type(value) is not type(DEFAULTS[key]):
            kind = {bool: "true or false", int: "an integer"}.get(type(DEFAULTS[key]),
                                                                  "a string")
            raise ConfigError(f"{where}: '{key}' must be {kind}, not {value!r}")
        else:
            values[key] = value
            origin[key] = where


def _merge_environment(values: dict, origin: dict, environ) -> None:
    for key, default in DEFAULTS.items():
        if key == "hooks":
            for event in HOOK_EVENTS:
                name = f"HPCCR_HOOKS_{event.upper()}"
                if environ.get(name) is not None:
                    values["hooks"][event] = [s.strip() for s in environ[name].split(",")
                                              if s.strip()]
                    origin[f"hooks.{event}"] = name
            continue
        name = f"HPCCR_{key.upper()}"
        text = environ.get(name)
        if text is None:
            continue
        if isinstance(default, bool):
            if text.lower() not in BOOLEANS:
                raise ConfigError(f"{name}: '{text}' is not one of {', '.join(BOOLEANS)}")
            values[key] = BOOLEANS[text.lower()]
        elif isinstance(default, int):
            try:
                values[key] = int(text)
            except ValueError:
                raise ConfigError(f"{name}: '{text}' is not an integer") from None
        else:
            values[key] = text
        origin[key] = name


def _validate(values: dict, origin: dict, source: str) -> Config:
    def bad(key: str, message: str) -> ConfigError:
        return ConfigError(f"{origin[key]}: {message}")

    for key in ("checkpoint_base", "log_dir", "run_dir"):
        if not os.path.isabs(values[key]):
            raise bad(key, f"'{key}' must be an absolute path, not '{values[key]}'")
    if values["keep"] < 1:
        raise bad("keep", f"'keep' must be at least 1, not {values['keep']}")
    if not 1 <= values["grace"] <= MAX_GRACE:
        raise bad("grace", f"'grace' must be 1..{MAX_GRACE} seconds, not {values['grace']}")
    if values["job_network"] not in NETWORKS:
        raise bad("job_network", f"'job_network' must be one of {', '.join(NETWORKS)}, not "
                  f"'{values['job_network']}'")
    try:
        subnet = ipaddress.IPv4Network(values["job_subnet"])
    except ValueError:
        raise bad("job_subnet", f"'job_subnet' must be an IPv4 network (a.b.c.d/n), not "
                  f"'{values['job_subnet']}'") from None
    if subnet.prefixlen > 30:
        raise bad("job_subnet", f"'job_subnet' {subnet} is too small for jobs")
    try:
        overlay_subnet = ipaddress.IPv4Network(values["overlay_subnet"])
    except ValueError:
        raise bad("overlay_subnet", "'overlay_subnet' must be an IPv4 network (a.b.c.d/n), "
                  f"not '{values['overlay_subnet']}'") from None
    if overlay_subnet.prefixlen > 24:
        raise bad("overlay_subnet", f"'overlay_subnet' {overlay_subnet} is smaller than a /24")
    first, _, last = values["overlay_ids"].partition("-")
    if not (first.isdigit() and last.isdigit() and 0 < int(first) <= int(last) < 1 << 24):
        raise bad("overlay_ids", "'overlay_ids' must be a range of VXLAN ids FIRST-LAST in "
                  f"1..{(1 << 24) - 1}, not '{values['overlay_ids']}'")
    if not 1 <= values["full_every"] <= MAX_FULL_EVERY:
        raise bad("full_every", f"'full_every' must be 1..{MAX_FULL_EVERY}, not "
                  f"{values['full_every']}")
    if not values["gpu_library"]:
        raise bad("gpu_library", "'gpu_library' must name a library (libcuda.so.1, or a path)")
    if not 1 <= values["gpu_lock_timeout"] <= MAX_GPU_LOCK_TIMEOUT:
        raise bad("gpu_lock_timeout", f"'gpu_lock_timeout' must be 1..{MAX_GPU_LOCK_TIMEOUT} "
                  f"seconds, not {values['gpu_lock_timeout']}")
    for event, specs in values["hooks"].items():
        for spec in specs:
            module, _, attr = spec.partition(":")
            if not module or not attr:
                raise bad(f"hooks.{event}", f"hook '{spec}' for {event} is not "
                          "\"module:function\"")
    return Config(Path(values["checkpoint_base"]), values["keep"], values["grace"],
                  Path(values["log_dir"]), Path(values["run_dir"]), values["tcp_close"],
                  values["job_network"], str(subnet), str(overlay_subnet),
                  (int(first), int(last)), values["hooks"], source, values["compress"],
                  values["direct_io"], values["full_every"], values["gpu_library"],
                  values["gpu_lock_timeout"])
