"""Durations as users write them: `90s`, `30m`, `2h`, `1d`, and Slurm's time formats."""

from __future__ import annotations

import re

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SUFFIXED = re.compile(r"^(\d+)([smhd])$")
_SLURM = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_duration(text: str) -> int:
    """Seconds in `text`.  A bare number counts minutes, as in Slurm (`--time=90`,
    `--checkpoint=90`); Slurm's `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS` are accepted,
    and so are `90s`, `30m`, `2h`, `1d`.  Raises ValueError with a message for anything else."""
    text = text.strip()
    m = _SUFFIXED.match(text)
    if m:
        seconds = int(m.group(1)) * UNITS[m.group(2)]
    else:
        m = _SLURM.match(text)
        if not m:
            raise ValueError(f"'{text}' is not a duration (e.g. 90s, 30m, 2h, MM:SS, "
                             "HH:MM:SS, D-HH)")
        days, a, b, c = m.groups()
        parts = [int(x) for x in (a, b, c) if x is not None]
        if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
            hours, minutes, secs = (parts + [0, 0])[:3]
            seconds = int(days) * 86400 + hours * 3600 + minutes * 60 + secs
        elif len(parts) == 1:  # minutes
            seconds = parts[0] * 60
        elif len(parts) == 2:  # MM:SS
            seconds = parts[0] * 60 + parts[1]
        else:  # HH:MM:SS
            seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    if seconds <= 0:
        raise ValueError(f"'{text}' is not a positive duration")
    return seconds
