"""The dashboard's HTML: Jinja2 templates (autoescaped) and the filters they use (pure).

Every page and fragment is rendered here, the live ones too: a log's new lines and a job's new
status reach the page as HTML fragments of the same templates as the first render, so the page's
script only puts them in place and never builds markup of its own.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from functools import cache
from importlib import resources
from typing import Any

import jinja2

from runner.web.board import JobCard, Resources
from runner.web.logview import LogLine, ansi_stylesheet, blocks_of

STATIC_FILES = ("dashboard.css", "dashboard.js", "favicon.svg")


def _when(value: float | None) -> str:
    if value is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    whole = round(value)
    hours, rest = divmod(whole, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {seconds:02d}s"
    return f"{seconds}s"


def _duration(card: JobCard) -> str:
    if card.duration is not None:
        return _seconds(card.duration)
    if card.started is not None and card.ended is None:
        return f"{_seconds(time.time() - card.started)} so far"
    return ""


def _size(value: int) -> str:
    step = 1024.0
    amount = float(value)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if amount < step or unit == "GiB":
            return f"{int(amount)} {unit}" if unit == "bytes" else f"{amount:.1f} {unit}"
        amount /= step
    return f"{value} bytes"


def _resources(value: Resources) -> str:
    parts = [f"{count} {name}" for count, name in (
        (value.nodes, "node(s)"), (value.tasks, "task(s)"), (value.cpus_per_task, "CPU(s) per task"),
        (value.gpus, "GPU(s)")) if count]
    if value.memory:
        parts.append(f"{value.memory} memory")
    if value.time:
        parts.append(f"time limit {value.time}")
    return ", ".join(parts)


@cache
def static_file(name: str) -> bytes:
    """A static asset's bytes (the ANSI classes' stylesheet is made from the converter's own)."""
    if name == "ansi.css":
        return ansi_stylesheet().encode()
    if name not in STATIC_FILES:
        raise KeyError(name)
    return resources.files("runner.web").joinpath("static", name).read_bytes()


@cache
def static_url(name: str) -> str:
    """An asset's URL, named by its content so a browser may keep it for good."""
    digest = hashlib.sha256(static_file(name)).hexdigest()[:16]
    return f"/static/{digest}/{name}"


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("runner.web", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=False, lstrip_blocks=False,
                             # The templates change only with a new install, which restarts the
                             # process; checking them would stat a file at every render (every
                             # log line sent to every viewer).
                             auto_reload=False)
    env.filters.update(when=_when, seconds=_seconds, duration=_duration, size=_size, resources=_resources)
    env.globals["static"] = static_url
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


def render_lines(lines: Iterable[LogLine]) -> str:
    """New log lines as the page nests them (`lines.html`)."""
    return render("lines.html", blocks=blocks_of(lines))
