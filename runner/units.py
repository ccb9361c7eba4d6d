"""Durations and memory sizes as people and Slurm write them."""

from __future__ import annotations

import re

MAX_SECONDS = 366 * 24 * 3600          # a year: anything longer is a typo
MAX_MEGABYTES = 1024 ** 3              # 1 PiB

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_duration(value: object) -> int:
    """Seconds from `90s`, `30m`, `4h`, `2d`, `1h30m`, or Slurm's `[D-]HH:MM:SS` / `MM:SS`.

    A bare integer is taken as minutes, as Slurm does for `--time`.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"must be a duration such as \"30m\", \"4h\" or \"1-00:00:00\", got {value!r}")
    text = str(value).strip()
    if len(text) > 32:
        raise ValueError(f"{text[:32]!r}... is too long for a duration (use \"90s\", \"30m\", \"4h\" "
                         "or \"D-HH:MM:SS\")")
    seconds: int | None = None
    if re.fullmatch(r"\d+", text):
        seconds = int(text) * 60
    elif re.fullmatch(r"(\d+[smhd])+", text):
        seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in re.findall(r"(\d+)([smhd])", text))
    else:
        match = _SLURM_TIME.match(text)
        if match and (":" in text or "-" in text):
            days, first, second, third = match.groups()
            parts = [int(p) for p in (first, second, third) if p is not None]
            if days is not None:
                # D-HH, D-HH:MM, D-HH:MM:SS
                hours, minutes, secs = [*parts, 0, 0][:3]
                seconds = int(days) * 86400 + hours * 3600 + minutes * 60 + secs
                if minutes >= 60 or secs >= 60:
                    seconds = None
            elif len(parts) == 2:          # MM:SS
                seconds = parts[0] * 60 + parts[1] if parts[1] < 60 else None
            elif len(parts) == 3:          # HH:MM:SS
                ok = parts[1] < 60 and parts[2] < 60
                seconds = parts[0] * 3600 + parts[1] * 60 + parts[2] if ok else None
    if seconds is None:
        raise ValueError(f"{text!r} is not a duration (use \"90s\", \"30m\", \"4h\" or \"D-HH:MM:SS\")")
    if seconds <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    if seconds > MAX_SECONDS:
        raise ValueError(f"{text!r} is longer than a year")
    return seconds


def slurm_time(seconds: int) -> str:
    """Seconds as Slurm's `D-HH:MM:SS` (rounded up to whole minutes, Slurm's granularity)."""
    minutes = -(-seconds // 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    return f"{days}-{hours:02d}:{mins:02d}:00"


def human_duration(seconds: int) -> str:
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


_MEMORY = re.compile(r"^(\d{1,20})\s*([KMGT])i?B?$", re.IGNORECASE)
_MEMORY_FACTOR_KB = {"K": 1, "M": 1024, "G": 1024 ** 2, "T": 1024 ** 3}


def parse_memory(value: object) -> int:
    """Megabytes from `512M`, `16G`, `1T` (binary units, as Slurm reads them).

    Kilobytes are rounded up to whole megabytes, Slurm's granularity, so a job never
    gets less than it asked for.
    """
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"must be a size such as \"512M\" or \"16G\", got {value!r}")
    match = _MEMORY.match(value.strip())
    if not match:
        raise ValueError(f"{value[:64]!r} is not a memory size (use \"512M\" or \"16G\")")
    kilobytes = int(match.group(1)) * _MEMORY_FACTOR_KB[match.group(2).upper()]
    if kilobytes < 1024:
        raise ValueError(f"{value!r} is less than 1M")
    megabytes = -(-kilobytes // 1024)
    if megabytes > MAX_MEGABYTES:
        raise ValueError(f"{value!r} is larger than 1P")
    return megabytes


def slurm_memory(megabytes: int) -> str:
    return f"{megabytes // 1024}G" if megabytes % 1024 == 0 else f"{megabytes}M"
