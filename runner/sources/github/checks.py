"""Reporting a job on GitHub: a check run per job, or a commit status where checks are not allowed.

A check run is created `queued` with the policy's decision in its summary, goes `in_progress`
with the tail of the job's log in `output.text` (updated at most every `UPDATE_INTERVAL` seconds,
and once more at the end) and ends `completed` with a conclusion (table below). While it is open
it offers a Cancel button (`actions`, identifier `cancel`); GitHub sends a click as a `check_run`
`requested_action` webhook, which reaches an agent through the gateway. GitHub's API description
says action buttons are displayed once a run completes, so the reliable way to cancel is the
`/hpc-runner cancel` comment, which works in both modes.

| how the job ended | conclusion |
| --- | --- |
| exit status 0 | success |
| another exit status, Slurm refused it, checkout or infrastructure failure, broken jobs file | failure |
| denied by the site's policy | failure (the reasons in the summary) |
| not approved by someone with write permission | action_required (what is missing, how to approve) |
| cancelled | cancelled |
| reached its Slurm walltime | timed_out |
| expired: waited in Slurm's queue past its queue_time, never ran | timed_out ("Expired in the queue") |

GitHub has no conclusion for a job that never ran because the cluster was busy. `timed_out` is the
nearest: time ran out, the test did not fail; `cancelled` would read as someone's decision, and
`failure` as a failing test.

GitHub's limits are respected by construction: `output.summary` and `output.text` at most 65535
*bytes* (cut on a UTF-8 boundary), a commit status description at most 140 characters. The log
tail sits in a fenced code block whose fence is longer than any backtick run in the log, after
ANSI escapes and control characters are removed, so a job's output cannot turn into Markdown.
Everything shown passed through the secret redactor (`runner.logs.redact`).

Repositories where the app may not use checks (`403 Resource not accessible by integration`, the
app lacks `checks: write` there) get a commit status per job instead, with context
`hpc-runner/<job>`, the outcome in its description and `target_url` the full log when `log_url` is
configured.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from runner.job import JobState, OutputFile
from runner.logs.redact import Redactor
from runner.sources import Ended
from runner.sources.github.client import GitHubClient, GitHubHTTPError, api_path

MAX_OUTPUT_BYTES = 65535
MAX_DESCRIPTION_CHARS = 140
UPDATE_INTERVAL = 10.0
# Raw log bytes kept for the tail: the code block, its fence and the note must still fit.
TAIL_BYTES = 60_000
NAME_PREFIX = "hpc-runner"
# A job's outputs in its summary: this many rows, then how many more; a path longer than
# MAX_PATH_CHARS is shortened in the middle, so the table stays well within the summary's limit.
MAX_OUTPUT_ROWS = 20
MAX_PATH_CHARS = 200
CANCEL_BUTTON = {"label": "Cancel", "description": "Cancel the Slurm job", "identifier": "cancel"}

Conclusion = Literal["success", "failure", "cancelled", "timed_out", "action_required", "neutral"]
Status = Literal["queued", "in_progress", "completed"]

# CSI sequences (colours, cursor moves), OSC and APC strings (titles, Buildkite-style timestamps)
# and the remaining two-character escapes.
_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[\]_][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_BACKTICKS = re.compile(r"`+")


def check_name(job: str | None) -> str:
    """`hpc-runner/<job>` (the check run's name and the status context), `hpc-runner` for the trigger."""
    return f"{NAME_PREFIX}/{job}" if job else NAME_PREFIX


def details_url(log_url: str | None, job_id: str | None) -> str | None:
    if not log_url or not job_id:
        return None
    return log_url.replace("{id}", job_id)


def iso_time(epoch: float | None = None) -> str:
    moment = datetime.fromtimestamp(int(time.time() if epoch is None else epoch), UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------ text


def clip_utf8(text: str, limit: int, marker: str = "\n…(cut)") -> str:
    """`text`, or its head plus `marker`, in at most `limit` UTF-8 bytes, never splitting a character."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    room = max(limit - len(marker.encode("utf-8")), 0)
    return raw[:room].decode("utf-8", "ignore") + marker


def tail_utf8(raw: bytes, limit: int) -> bytes:
    """The last at most `limit` bytes of `raw`, starting on a character boundary."""
    if len(raw) <= limit:
        return raw
    cut = raw[len(raw) - limit:]
    # Skip UTF-8 continuation bytes (10xxxxxx) of a character whose start was cut off.
    skip = 0
    while skip < min(3, len(cut)) and cut[skip] & 0xC0 == 0x80:
        skip += 1
    return cut[skip:]


def readable(text: str) -> str:
    """Log text as a terminal would leave it: no escape sequences, carriage returns applied."""
    text = _ANSI.sub("", text.replace("\r\n", "\n"))
    lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    return _CONTROL.sub("", "\n".join(lines))


def code_block(text: str, limit: int, *, cut_note: str) -> str:
    """`text` in a fenced code block of at most `limit` bytes; when it must be cut, the start goes
    and `cut_note` (Markdown, outside the block) says so."""
    longest = max((len(run) for run in _BACKTICKS.findall(text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = text if text.endswith("\n") or not text else text + "\n"
    whole = f"{fence}\n{body}{fence}\n"
    if len(whole.encode("utf-8")) <= limit:
        return whole
    note = cut_note + "\n\n"
    room = limit - len(note.encode("utf-8")) - 2 * len(fence) - 2
    kept = tail_utf8(body.encode("utf-8"), max(room, 0)).decode("utf-8", "ignore")
    return f"{note}{fence}\n{kept}{fence}\n"


def code(value: object) -> str:
    """An inline code span for a value someone else chose (a job name, a branch), on one line."""
    text = " ".join(str(value).split())
    longest = max((len(run) for run in _BACKTICKS.findall(text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


class LogTail:
    """The last `TAIL_BYTES` of a job's log, redacted, fed with `(offset, data)` pieces.

    Offsets make it safe to feed the same bytes twice (a resumed job re-reads from its last saved
    offset): what lies before the end already seen is skipped. `(0, b"")` says the file started
    again from nothing.
    """

    def __init__(self, secrets: Iterable[str] = (), limit: int = TAIL_BYTES) -> None:
        self._secrets = tuple(secrets)
        self._limit = limit
        self._redactor = Redactor(self._secrets)
        self._buffer = bytearray()
        self.end = 0             # offset just after the last raw byte taken in
        self.cut = False         # bytes were dropped from the front
        self.version = 0         # grows whenever the visible text may have changed

    def feed(self, offset: int, data: bytes) -> None:
        if not data:
            if offset == 0 and self.end:
                self._append(self._redactor.flush())
                self._append(b"\n--- the log file started again ---\n")
                self._redactor = Redactor(self._secrets)
                self.end = 0
            return
        if offset < self.end:
            data = data[self.end - offset:]
            offset = self.end
            if not data:
                return
        self.end = offset + len(data)
        self._append(self._redactor.feed(data))

    def seed(self, data: bytes, end: int) -> None:
        """What the log held up to `end` before this agent started reading (a restart)."""
        self._buffer.clear()
        self._redactor = Redactor(self._secrets)
        self._append(self._redactor.feed(data[-self._limit * 2:]))
        self.cut = self.cut or len(data) > self._limit
        self.end = end

    def close(self) -> None:
        """The job ended: release what the redactor held back."""
        self._append(self._redactor.flush())

    def _append(self, data: bytes) -> None:
        if not data:
            return
        self._buffer += data
        if len(self._buffer) > self._limit:
            del self._buffer[:len(self._buffer) - self._limit]
            self.cut = True
        self.version += 1

    def text(self) -> str:
        return readable(tail_utf8(bytes(self._buffer), self._limit).decode("utf-8", "replace"))


def log_text(tail: LogTail, *, full_log: str | None) -> str:
    """`output.text`: the tail in a code block, within GitHub's 65535 bytes."""
    where = f" (the whole log: {full_log})" if full_log else ""
    note = f"*Only the end of the log is shown{where}.*"
    text = tail.text()
    if not text:
        return "*No output yet.*" if not tail.cut else note
    block = code_block(text, MAX_OUTPUT_BYTES - len(note.encode()) - 4, cut_note=note)
    if tail.cut and not block.startswith(note):
        block = f"{note}\n\n{block}"
    return block


# ------------------------------------------------------------------------------------ completions


@dataclass(frozen=True)
class Completion:
    """How a report ends: conclusion, title and the lines that explain it."""

    conclusion: Conclusion
    title: str
    lines: tuple[str, ...] = ()


def completion_of(ended: Ended) -> Completion:
    state = ended.state
    detail = (ended.detail,) if ended.detail else ()
    if state == JobState.succeeded:
        return Completion("success", "Succeeded")
    if state == JobState.failed:
        if ended.exit_status is not None:
            return Completion("failure", f"Failed with exit status {ended.exit_status}", detail)
        return Completion("failure", "Failed", detail)
    if state == JobState.cancelled:
        return Completion("cancelled", "Cancelled", detail)
    if state == JobState.timed_out:
        return Completion("timed_out", "Reached its walltime", detail)
    if state == JobState.expired:
        return Completion("timed_out", "Expired in the queue: the cluster was busy, the job did not run",
                          detail)
    if state == JobState.denied:
        return Completion("failure", "Denied by the site's policy", detail)
    return Completion("failure", "Could not run", detail)


def status_state(status: Status, conclusion: Conclusion | None) -> str:
    """A commit status `state` for a check run's status and conclusion."""
    if status != "completed" or conclusion is None:
        return "pending"
    return {"success": "success", "neutral": "success", "failure": "failure", "timed_out": "failure",
            "cancelled": "error", "action_required": "pending"}[conclusion]


def status_description(text: str) -> str:
    """A commit status description: one line of at most 140 characters."""
    line = " ".join(text.split())
    return line if len(line) <= MAX_DESCRIPTION_CHARS else line[:MAX_DESCRIPTION_CHARS - 1] + "…"


# ------------------------------------------------------------------------------------ request bodies


def _output(title: str, summary: str, text: str | None) -> dict[str, Any]:
    output = {"title": clip_utf8(" ".join(title.split()), 1000),
              "summary": clip_utf8(summary, MAX_OUTPUT_BYTES)}
    if text is not None:
        output["text"] = clip_utf8(text, MAX_OUTPUT_BYTES)
    return output


def create_body(*, name: str, head_sha: str, external_id: str, title: str, summary: str,
                details_url: str | None, status: Status = "queued", conclusion: Conclusion | None = None,
                text: str | None = None, cancellable: bool = True,
                now: float | None = None) -> dict[str, Any]:
    """`POST /repos/{owner}/{repo}/check-runs`."""
    body: dict[str, Any] = {"name": name, "head_sha": head_sha, "external_id": external_id,
                            "output": _output(title, summary, text)}
    if details_url:
        body["details_url"] = details_url
    if conclusion is not None:
        body.update(status="completed", conclusion=conclusion, completed_at=iso_time(now))
    else:
        body["status"] = status
        if status == "in_progress":
            body["started_at"] = iso_time(now)
        if cancellable:
            body["actions"] = [dict(CANCEL_BUTTON)]
    return body


def update_body(*, title: str, summary: str, text: str | None, status: Status | None = None,
                conclusion: Conclusion | None = None, details_url: str | None = None,
                now: float | None = None) -> dict[str, Any]:
    """`PATCH /repos/{owner}/{repo}/check-runs/{id}`; completing it also takes the Cancel button away."""
    body: dict[str, Any] = {"output": _output(title, summary, text)}
    if details_url:
        body["details_url"] = details_url
    if conclusion is not None:
        body.update(status="completed", conclusion=conclusion, completed_at=iso_time(now), actions=[])
    elif status is not None:
        body["status"] = status
        if status == "in_progress":
            body["started_at"] = iso_time(now)
    return body


def status_body(*, context: str, state: str, description: str, target_url: str | None) -> dict[str, Any]:
    """`POST /repos/{owner}/{repo}/statuses/{sha}`."""
    body: dict[str, Any] = {"state": state, "context": context,
                            "description": status_description(description)}
    if target_url:
        body["target_url"] = target_url
    return body


@dataclass(frozen=True)
class Table:
    """A Markdown table of cells already rendered (`cell` each), and a line after it."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    after: str | None = None

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "|".join(" --- " for _ in self.header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + (f"\n\n{self.after}" if self.after else "")


def cell(text: str) -> str:
    """A table cell's text: a pipe in it would end the cell, even inside a code span."""
    return text.replace("|", "\\|")


def human_bytes(size: int) -> str:
    """`4,203 bytes`, or `4.1 KiB (4,203 bytes)` from a KiB up."""
    exact = f"{size:,} byte{'' if size == 1 else 's'}"
    if size < 1024:
        return exact
    value, units = size / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value /= 1024
        units.pop(0)
    return f"{value:.1f} {units[0]} ({exact})"


def _short_path(path: str, limit: int = MAX_PATH_CHARS) -> str:
    """A path of at most `limit` characters, its middle given up first (the name matters most)."""
    if len(path) <= limit:
        return path
    keep = limit - 1
    return path[:keep // 3] + "…" + path[len(path) - (keep - keep // 3):]


def outputs_sections(outputs: Sequence[OutputFile], left_out: Sequence[tuple[str, str]] = (), *,
                     rows: int = MAX_OUTPUT_ROWS) -> dict[str, str | Table | list[str]]:
    """The summary's account of a job's collected outputs (path, size, sha256), at most `rows` of
    them and then how many more, and of the files it matched but left out, and why."""
    sections: dict[str, str | Table | list[str]] = {}
    if outputs:
        total = sum(o.size for o in outputs)
        shown = tuple((cell(code(_short_path(o.path))), human_bytes(o.size), code(o.sha256))
                      for o in outputs[:rows])
        more = len(outputs) - len(shown)
        heading = f"Outputs ({len(outputs)}, {human_bytes(total)})"
        sections[heading] = Table(("Path", "Size", "SHA-256"), shown, f"and {more} more" if more else None)
    if left_out:
        lines = [f"{code(_short_path(path))}: {' '.join(why.split())}" for path, why in left_out[:rows]]
        if len(left_out) > rows:
            lines.append(f"and {len(left_out) - rows} more")
        sections["Outputs left out"] = lines
    return sections


def summary(sections: Mapping[str, str | Table | Iterable[str]]) -> str:
    """Markdown: a bold heading per section with its text, its table or its list of lines."""
    parts = []
    for heading, content in sections.items():
        if isinstance(content, str):
            parts.append(f"**{heading}:** {content}")
        elif isinstance(content, Table):
            parts.append(f"**{heading}:**\n\n{content.markdown()}")
        else:
            items = list(content)
            if items:
                parts.append(f"**{heading}:**\n" + "\n".join(f"- {item}" for item in items))
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------ I/O


def checks_forbidden(exc: GitHubHTTPError) -> bool:
    """GitHub's answer when the app has no `checks: write` on a repository."""
    return exc.status == 403 and "not accessible by integration" in exc.message.lower()


class Report:
    """One job's (or one trigger's) report on GitHub: a check run, else a commit status.

    `forbidden` is shared by all reports of the agent: repositories whose check runs GitHub refused
    with 403, which get commit statuses from then on. `ref` is what `open` created (persist it:
    `kind` is "check" or "status", `check_run_id` the check run), so a restarted agent carries on
    with the same check run.
    """

    def __init__(self, client: GitHubClient, *, repository: str, sha: str, name: str, external_id: str,
                 details_url: str | None, forbidden: set[str], kind: str | None = None,
                 check_run_id: int | None = None, cancellable: bool = True) -> None:
        self._client = client
        self.repository = repository
        self.sha = sha
        self.name = name
        self.external_id = external_id
        self.details_url = details_url
        self._forbidden = forbidden
        self.kind = kind
        self.check_run_id = check_run_id
        self.cancellable = cancellable
        self._status_sent: tuple[str, str] | None = None
        self.writes = 0
        # What a commit status's short description adds to a conclusion (a check run has room for
        # it in its summary), such as a denial's first reason.
        self.status_note: str | None = None

    def _path(self, template: str, **values: str | int) -> str:
        owner, name = self.repository.split("/")
        return api_path(template, owner=owner, repo=name, **values)

    async def find(self) -> int | None:
        """The check run already created for this external id (by an earlier agent), if any."""
        path = self._path("/repos/{owner}/{repo}/commits/{ref}/check-runs", ref=self.sha)
        params: dict[str, str | int] = {"check_name": self.name, "filter": "all", "per_page": 100}
        async for run in self._client.paginate(path, params=params, key="check_runs"):
            if isinstance(run, Mapping) and run.get("external_id") == self.external_id:
                return int(run["id"])
        return None

    async def open(self, *, title: str, summary: str, status: Status = "queued",
                   conclusion: Conclusion | None = None, text: str | None = None) -> None:
        """Create the check run (or the first commit status)."""
        if self.repository.lower() not in self._forbidden:
            body = create_body(name=self.name, head_sha=self.sha, external_id=self.external_id, title=title,
                               summary=summary, details_url=self.details_url, status=status,
                               conclusion=conclusion, text=text, cancellable=self.cancellable)
            try:
                answer = await self._client.post(self._path("/repos/{owner}/{repo}/check-runs"), body)
                self.writes += 1
                self.kind, self.check_run_id = "check", int(answer["id"])
                return
            except GitHubHTTPError as exc:
                if not checks_forbidden(exc):
                    raise
                self._forbidden.add(self.repository.lower())
        self.kind = "status"
        await self._status(status if conclusion is None else "completed", conclusion,
                           self._described(title, ()) if conclusion is not None else title)

    async def update(self, *, title: str, summary: str, text: str | None,
                     status: Status | None = None) -> None:
        if self.kind == "check" and self.check_run_id is not None:
            body = update_body(title=title, summary=summary, text=text, status=status)
            if await self._patch(body):
                return
        await self._status(status or "in_progress", None, title)

    async def complete(self, completion: Completion, *, summary: str, text: str | None) -> None:
        if self.kind == "check" and self.check_run_id is not None:
            body = update_body(title=completion.title, summary=summary, text=text,
                               conclusion=completion.conclusion)
            if await self._patch(body):
                return
        await self._status("completed", completion.conclusion,
                           self._described(completion.title, completion.lines))

    def _described(self, title: str, lines: tuple[str, ...]) -> str:
        return "; ".join((title, *lines, *((self.status_note,) if self.status_note else ())))

    async def _patch(self, body: dict[str, Any]) -> bool:
        """False when checks became forbidden meanwhile (the report goes on as a status)."""
        assert self.check_run_id is not None
        try:
            path = self._path("/repos/{owner}/{repo}/check-runs/{id}", id=self.check_run_id)
            await self._client.patch(path, body)
            self.writes += 1
            return True
        except GitHubHTTPError as exc:
            if not checks_forbidden(exc):
                raise
        self._forbidden.add(self.repository.lower())
        self.kind = "status"
        return False

    async def _status(self, status: Status, conclusion: Conclusion | None, description: str) -> None:
        state = status_state(status, conclusion)
        text = status_description(description)
        if self._status_sent == (state, text):
            return
        body = status_body(context=self.name, state=state, description=text, target_url=self.details_url)
        await self._client.post(self._path("/repos/{owner}/{repo}/statuses/{sha}", sha=self.sha), body)
        self.writes += 1
        self._status_sent = (state, text)
