"""The job's environment as an Apptainer `--env-file`.

Apptainer reads the env file with its embedded shell interpreter on the host, and it
expands `$VAR` and `$(...)` there even under `--no-eval`; only single-quoted text stays
literal. So every value is single-quoted, always, whatever it contains: a job's env
values come from a CI service and must reach the job byte for byte, never run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class EnvFileError(ValueError):
    """A name or value that cannot be written to an env file faithfully."""


def single_quote(value: str) -> str:
    """Quote for a POSIX shell so that nothing in `value` is special.

    Inside single quotes only the quote itself ends the string, so each `'` becomes
    `'"'"'` (close, a double-quoted quote, reopen). Unlike `shlex.quote` this quotes
    even "safe" values, which keeps every line of the file the same shape.
    """
    return "'" + value.replace("'", "'\"'\"'") + "'"


def check_env_name(name: str) -> None:
    if not ENV_NAME_RE.fullmatch(name):
        raise EnvFileError(f"environment variable name {name!r} is not a shell name "
                           "(letters, digits and '_', not starting with a digit)")


def check_env_value(name: str, value: str) -> None:
    # A process environment is a list of NUL-terminated strings: a NUL cannot survive.
    if "\x00" in value:
        raise EnvFileError(f"the value of {name} contains a NUL character")


def render_env_file(env: Mapping[str, str]) -> str:
    """`NAME='value'` lines, sorted by name, for `apptainer exec --env-file`."""
    lines = []
    for name in sorted(env):
        value = env[name]
        check_env_name(name)
        check_env_value(name, value)
        lines.append(f"{name}={single_quote(value)}\n")
    return "".join(lines)
