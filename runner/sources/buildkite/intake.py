"""What an accepted Buildkite job must be before anything of the agent reads it.

The job (the accept answer) holds the pipeline author's step: its command, env and plugin
blocks, nested as deep and as large as the uploaded YAML was. Canonicalising the signed values,
filling in matrix values and translating the plugin block all recurse through that data, so a
block nested a few hundred levels deep would raise RecursionError out of them. `job_problem`
walks the job iteratively, bounds its depth and size, and checks the types the rest of the
source relies on, before any of that code sees it. Pure functions.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

# Levels of objects and arrays, counted from the job itself (the step's plugin configs start at
# its fifth level). Hand-written plugin configs and env are a few levels deep; 64 leaves room for
# any of them, while every recursive walk of the job stays far below Python's limit of 1000
# frames (canonicalisation takes a few frames per level).
MAX_NESTING = 64
# Values (objects, arrays, strings, numbers, booleans, nulls) in the whole job. A job's env has
# some hundred variables and a step some dozen values; even a large matrix stays in thousands.
MAX_VALUES = 100_000
# Characters of all strings and keys in the job. Real jobs are kilobytes, a long inline script
# some hundred kilobytes; this bounds the time and memory a job's checks can take.
MAX_TEXT = 16 * 1024 * 1024

PLUGINS_VAR = "BUILDKITE_PLUGINS"

# A lone surrogate (JSON allows `\ud800`) is no Unicode text: it cannot be encoded for the log,
# and Buildkite's own agent reads it as U+FFFD, so it can never match what was signed.
_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.:#@/-]{1,64}")
# The top-level fields of a job that its start, log and finish read.
_FINISHING_KEYS = ("id", "token", "chunks_max_size_bytes", "chunks_interval_seconds", "log_max_size_bytes")


def job_problem(job: Mapping[str, Any]) -> str | None:
    """Why the job cannot be taken as given (one line for its log), or None.

    Never raises and never recurses, whatever JSON the job is.
    """
    problem = _bounds_problem(job, "the job")
    if problem is not None:
        return problem
    env = job.get("env")
    if env is not None:
        problem = _strings_problem("env", env)
        if problem is not None:
            return problem
        plugins = env.get(PLUGINS_VAR)
        if isinstance(plugins, str) and plugins.strip():
            problem = _plugins_problem(plugins)
            if problem is not None:
                return problem
    step = job.get("step")
    if step is not None and not isinstance(step, Mapping):
        return f"the job's step is not a map (it is {_kind(step)})"
    permutation = job.get("matrix_permutation")
    return None if permutation is None else _strings_problem("matrix_permutation", permutation)


def _strings_problem(field: str, value: object) -> str | None:
    """What keeps `value`, the job's `field`, from being a map of strings, or None."""
    if not isinstance(value, Mapping):
        return f"the job's {field} is not a map of strings (it is {_kind(value)})"
    for name, item in value.items():
        if not isinstance(item, str):
            return f"the job's {field} is not a map of strings ({_name(name)} is {_kind(item)})"
    return None


def finishing_part(job: Mapping[str, Any]) -> dict[str, Any]:
    """What is kept of a job that has a problem: what finishing it takes (its id, token and log
    settings), nothing that any reading of the job could stumble on."""
    return {key: job[key] for key in _FINISHING_KEYS
            if isinstance(job.get(key), str | int) and not _SURROGATE.search(str(job[key]))}


def _plugins_problem(text: str) -> str | None:
    # Both the signature check and the translation parse this JSON and walk what it holds.
    whole = f"the job's {PLUGINS_VAR}"
    try:
        plugins = json.loads(text)
    except RecursionError:
        return f"{whole} is nested deeper than {MAX_NESTING} levels"
    except ValueError:
        return None  # not JSON: the signature check and the translation say so
    return _bounds_problem(plugins, whole, root=PLUGINS_VAR)


def _bounds_problem(value: object, whole: str, *, root: str = "") -> str | None:
    """Depth, size and JSON-ness of `value` (called `whole`), walked with an explicit stack.

    A problem names the part at fault to two levels below the root (`step.plugins`).
    """
    values = 0
    text = 0
    stack: list[tuple[object, int, str]] = [(value, 1, root)]
    while stack:
        item, depth, where = stack.pop()
        part = f"the job's {where}" if where else whole
        values += 1
        if values > MAX_VALUES:
            return f"{whole} holds more than {MAX_VALUES} values"
        if isinstance(item, str):
            text += len(item)
            if _SURROGATE.search(item):
                return f"{part} holds a lone surrogate, which is no Unicode text"
        elif isinstance(item, dict | list):
            if depth > MAX_NESTING:
                return f"{part} is nested deeper than {MAX_NESTING} levels"
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in children:
                if isinstance(key, str):
                    text += len(key)
                    if _SURROGATE.search(key):
                        return f"{part} holds a lone surrogate, which is no Unicode text"
                stack.append((child, depth + 1, where if depth > 2 else _joined(where, key)))
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{part} holds {item}, which JSON does not allow"
        elif not (item is None or isinstance(item, bool | int)):
            return f"{part} holds {_kind(item)}, which is no JSON value"
        if text > MAX_TEXT:
            return f"{whole} holds more than {MAX_TEXT} characters of text"
    return None


def _joined(where: str, key: object) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    name = _name(key)
    return f"{where}.{name}" if where else name


def _name(key: object) -> str:
    """A name from the job, for the log: as it is when plain, else only its length."""
    text = str(key)
    return text if _PLAIN_NAME.fullmatch(text) else f"<a name of {len(text)} characters>"


def _kind(value: object) -> str:
    if isinstance(value, Mapping):
        return "a map"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"
