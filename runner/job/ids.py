"""A job's id, and the name its Slurm job carries."""

from __future__ import annotations

import re
import secrets
import threading
import time

# Every Slurm job of the agent is named this and its id: how a restarted agent finds its jobs.
SLURM_JOB_NAME_PREFIX = "hpcr-"
# Ids are used in Slurm job names, file names and URLs, so they stay within [0-9a-z-].
JOB_ID_PATTERN = re.compile(r"[0-9a-z][0-9a-z-]{0,62}")

# Crockford's base32, lowercase: no i, l, o, u to misread, and ASCII order equals numeric order,
# so ids sort as strings in the order they were made.
_ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_ID_TIME_CHARS = 9                       # 45 bits of milliseconds: good until the year 3084
_ID_RANDOM_CHARS = 4                     # 20 bits
_ID_RANDOM_BITS = 5 * _ID_RANDOM_CHARS
_id_lock = threading.Lock()
_last_id_value = 0


def new_job_id() -> str:
    """A 13-character id: creation time in ms, then random bits; unique and increasing in this process.

    Within one millisecond the random part is incremented rather than redrawn (as ULIDs do), so ids
    drawn in a tight loop neither collide nor lose their creation order.
    """
    global _last_id_value
    candidate = (time.time_ns() // 1_000_000) << _ID_RANDOM_BITS | secrets.randbits(_ID_RANDOM_BITS)
    with _id_lock:
        value = max(candidate, _last_id_value + 1)
        _last_id_value = value
    return _encode_id(value)


def _encode_id(value: int) -> str:
    chars = []
    for _ in range(_ID_TIME_CHARS + _ID_RANDOM_CHARS):
        value, digit = divmod(value, 32)
        chars.append(_ID_ALPHABET[digit])
    return "".join(reversed(chars))


def is_job_id(text: str) -> bool:
    return JOB_ID_PATTERN.fullmatch(text) is not None


def slurm_job_name(job_id: str) -> str:
    if not is_job_id(job_id):
        raise ValueError(f"job id {job_id!r} cannot name a Slurm job")
    return SLURM_JOB_NAME_PREFIX + job_id
