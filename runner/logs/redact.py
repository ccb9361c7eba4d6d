"""Secret redaction for a job's log stream, as the Buildkite agent does it.

The values of environment variables whose names match glob patterns are replaced in the output
by a fixed marker. Redaction runs before the log is chunked: once bytes are cut into a chunk
they may already be on their way to the server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase

__all__ = [
    "DEFAULT_REDACTED_VARS",
    "MASK_BYTE",
    "MIN_SECRET_BYTES",
    "Redactor",
    "mask_secrets",
    "possible_secret_start",
    "secret_needles",
    "secret_values",
    "short_secret_names",
]

# The agent's default `--redacted-vars` (BUILDKITE_REDACTED_VARS), in its order.
DEFAULT_REDACTED_VARS: tuple[str, ...] = (
    "*_PASSWORD",
    "*_SECRET",
    "*_TOKEN",
    "*_PRIVATE_KEY",
    "*_SSH_KEY",
    "*_ACCESS_KEY",
    "*_SECRET_KEY",
    "*_CONNECTION_STRING",
    "*_API_KEY",
)

# Shorter values are not redacted: API_TOKEN=none would otherwise blank out every "none" in
# the log. Counted in bytes, as the agent counts them.
MIN_SECRET_BYTES = 6


def _encode(text: str) -> bytes:
    # surrogateescape gives back the exact bytes of an environment value that is not UTF-8.
    return text.encode("utf-8", "surrogateescape")


def _matching(env: Mapping[str, str], patterns: Sequence[str]) -> list[tuple[str, str]]:
    # Names are matched case-sensitively, like the agent's path.Match; the configured patterns
    # add to the defaults rather than replace them, so a site cannot switch them off by accident.
    globs = (*DEFAULT_REDACTED_VARS, *patterns)
    return [(name, value) for name, value in env.items() if any(fnmatchcase(name, g) for g in globs)]


def secret_values(env: Mapping[str, str], patterns: Sequence[str]) -> list[str]:
    """The distinct values to redact: those of variables whose names match a default or given pattern.

    Values shorter than `MIN_SECRET_BYTES` are left out (see `short_secret_names`).
    """
    values: dict[str, None] = {}
    for _, value in _matching(env, patterns):
        if len(_encode(value)) >= MIN_SECRET_BYTES:
            values[value] = None
    return list(values)


def redact_env(env: Mapping[str, str], patterns: Sequence[str],
               replacement: str = "[REDACTED]") -> dict[str, str]:
    """`env` with the values of the variables the patterns name replaced, whatever their length."""
    secret = {name for name, _ in _matching(env, patterns)}
    return {name: replacement if name in secret else value for name, value in env.items()}


def short_secret_names(env: Mapping[str, str], patterns: Sequence[str]) -> list[str]:
    """Names that match a pattern but whose non-empty value is too short to redact, for a warning."""
    return [name for name, value in _matching(env, patterns) if 0 < len(_encode(value)) < MIN_SECRET_BYTES]


class Redactor:
    """Replaces every occurrence of the secrets in a byte stream, however the stream is split.

    Occurrences that overlap (of one secret or of several) become a single replacement; all
    other bytes pass through unchanged. A tail that could be the start of a secret completed by
    the next write is held back between calls (at most len(longest secret) - 1 bytes);
    `flush()` releases it at the end of the stream.
    """

    def __init__(self, secrets: Iterable[str], replacement: str = "[REDACTED]") -> None:
        needles = {_encode(secret) for secret in secrets} - {b""}
        self._needles = tuple(sorted(needles))
        self._replacement = _encode(replacement)
        self._pending = b""
        # How many leading bytes of _pending lie inside a match whose replacement was already
        # written: an occurrence that overlaps them extends that match rather than adding one.
        self._covered = 0

    def feed(self, data: bytes) -> bytes:
        """The redacted output that `data` completes."""
        if not data:
            return b""
        return self._process(self._pending + data, final=False)

    def flush(self) -> bytes:
        """Everything held back, redacted; the redactor then starts afresh."""
        return self._process(self._pending, final=True)

    def _process(self, buf: bytes, *, final: bool) -> bytes:
        # An occurrence not yet seen must include a byte still to come, so it starts in a tail of
        # `buf` that begins some secret: everything before `end` is settled.
        end = len(buf) if final else self._tail_start(buf)
        if end == 0:
            # Nothing is settled: the tail, and how much of it is already replaced, carry over.
            self._pending = buf
            return b""
        out = bytearray()
        pos = 0
        for start, stop in self._matches(buf):
            if start >= end:
                break
            out += buf[pos:start]
            if not (start == 0 and self._covered):
                out += self._replacement
            pos = stop
        if pos < end:
            out += buf[pos:end]
        # A match that runs past `end` was replaced whole; remember how far it reaches.
        self._covered = max(0, pos - end)
        self._pending = buf[end:]
        return bytes(out)

    def _tail_start(self, buf: bytes) -> int:
        # Holding back only a tail that may begin a secret, rather than always len(longest) - 1
        # bytes, keeps output that cannot be part of a secret from waiting for the next write.
        return possible_secret_start(buf, self._needles)

    def _matches(self, buf: bytes) -> list[tuple[int, int]]:
        """The (start, stop) ranges to replace in `buf`, sorted, overlapping ones merged."""
        found = [(0, self._covered)] if self._covered else []
        for needle in self._needles:
            at = buf.find(needle)
            while at != -1:
                found.append((at, at + len(needle)))
                at = buf.find(needle, at + 1)
        found.sort()
        merged: list[tuple[int, int]] = []
        for start, stop in found:
            if merged and start < merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
            else:
                merged.append((start, stop))
        return merged


# What a secret's bytes become where a log must keep its length (`mask_secrets`).
MASK_BYTE = b"*"


def secret_needles(secrets: Iterable[str]) -> tuple[bytes, ...]:
    """The secrets as the bytes a log would hold them in, longest first."""
    return tuple(sorted({_encode(secret) for secret in secrets} - {b""}, key=len, reverse=True))


def possible_secret_start(buf: bytes, needles: Sequence[bytes]) -> int:
    """Where the longest tail of `buf` that is a proper prefix of a secret begins, or len(buf):
    the bytes from there may turn out to be a secret once more of the stream comes."""
    start = len(buf)
    for needle in needles:
        at = buf.find(needle[:1], max(0, len(buf) - len(needle) + 1))
        while at != -1 and at < start:
            if needle.startswith(buf[at:]):
                start = at
                break
            at = buf.find(needle[:1], at + 1)
    return start


def mask_secrets(buf: bytes, needles: Sequence[bytes]) -> bytes:
    """`buf` with every byte of every occurrence of a secret replaced by MASK_BYTE: unlike the
    Redactor's marker, the length stays, so a masked log's offsets are the log file's."""
    if not needles:
        return buf
    out = bytearray(buf)
    for needle in needles:
        at = buf.find(needle)
        while at != -1:
            out[at:at + len(needle)] = MASK_BYTE * len(needle)
            at = buf.find(needle, at + 1)
    return bytes(out)


def read_masked(read: Callable[[int, int], bytes], start: int, size: int, needles: Sequence[bytes], *,
                final: bool) -> bytes:
    """Up to `size` bytes of a log from `start` (`read(offset, size)` reads the log), with every
    secret masked in place, those that straddle `start` or the end of the read included. Unless
    the log is `final`, a tail that may begin a secret whose rest is not written yet is left out:
    it comes with the next read, once the log has grown."""
    if not needles:
        return read(start, size)
    reach = len(needles[0]) - 1                 # the longest secret's length, less one
    before = max(0, start - reach)
    wanted = (start - before) + size + reach
    window = read(before, wanted)
    masked = mask_secrets(window, needles)[start - before:start - before + size]
    if final or len(window) >= wanted:
        return masked
    return masked[:max(0, possible_secret_start(window, needles) - (start - before))]
