"""The dashboard's pages and their live parts, over any `JobBoard` (the hub's, an agent's).

    GET  /                              the jobs the viewer may see (filters, pages)
    GET  /rows?...                      the list's rows alone, for the page's live refresh
    GET  /events/jobs                   server-sent events: `changed` whenever a job changed
    GET  /jobs/ID                       a job: status, decision, resources, timing, its log's end
    GET  /jobs/ID/events?offset=N&number=M   server-sent events: `lines` (HTML of the log's lines
                                        from byte N, numbered from M), `status`, then `end`
    GET  /jobs/ID/log/earlier?before=N&number=M   the lines before byte N, as JSON
    GET  /jobs/ID/log/raw               the log's bytes, exactly as the job wrote them
    GET  /jobs/ID/provenance            its provenance record (a download), once it ended
    GET  /jobs/ID/outputs/PATH          an output file its record names (a download, never shown)
    POST /jobs/ID/cancel                (CSRF token) cancel it, for its submitter and its admins
    POST /jobs/ID/replay                (CSRF token) replay it, for the same (an agent's pages only)
    GET  /static/DIGEST/NAME            the pages' own script and stylesheets

A job the viewer may not see is 404, as one that does not exist. Who the viewer is comes from
`viewer_of` (the login session at the hub, the peer's uid on an agent's socket); without one a
page sends the browser to `login_path`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response

from runner.job import JOB_ID_PATTERN
from runner.logging_setup import get_logger
from runner.web.board import (
    STATES,
    JobBoard,
    JobDetail,
    ListQuery,
    NotCancellable,
    NotReplayable,
    NotVisible,
    OpenedOutput,
    Page,
    Viewer,
    parse_list_query,
)
from runner.web.logview import LineCounter, LogLine, LogLines, blocks_of, count_lines, lines_of
from runner.web.render import render, render_lines, static_file
from runner.web.security import no_store
from runner.web.sessions import CSRF_FIELD, check_csrf, csrf_token
from runner.web.whatran import WhatRan, what_ran

log = get_logger("runner.web")

ViewerOf = Callable[[web.Request], Awaitable[Viewer | None]]

SOURCES = ("api", "github", "buildkite", "local")
# What a job's page shows of its log at first: its end (as Buildkite shows a log's last 2 MB);
# "Load earlier" brings the rest in pieces of the same size.
TAIL_BYTES = 1024 * 1024
EARLIER_BYTES = 1024 * 1024
# How much of the log one event carries at most, and how much one read takes.
READ_BYTES = 256 * 1024
COUNT_READ_BYTES = 4 * 1024 * 1024
# A quiet stream still says something this often, so proxies keep it open.
HEARTBEAT_SECONDS = 15.0
# The list refreshes at most this often, however busy the cluster.
JOBS_EVENT_SECONDS = 1.0

_ID = JOB_ID_PATTERN.pattern
_CONTENT_TYPES = {"css": "text/css", "js": "text/javascript", "svg": "image/svg+xml"}


@dataclass(frozen=True)
class LogView:
    """The part of a log a page shows: bytes [start, end), lines first_number..next_number-1."""

    start: int
    end: int
    first_number: int
    next_number: int
    lines: list[LogLine]


class LineNumbers:
    """How many lines a log holds before a byte offset at a line's start, counted once per job and
    offset (a log only grows), for the views that start partway."""

    def __init__(self, capacity: int = 256) -> None:
        self._known: OrderedDict[str, tuple[int, int]] = OrderedDict()   # job -> (offset, lines)
        self._capacity = capacity

    async def before(self, board: JobBoard, viewer: Viewer, job_id: str, offset: int) -> int:
        known_offset, known_lines = self._known.get(job_id, (0, 0))
        if known_offset > offset:
            known_offset, known_lines = 0, 0
        counter = LineCounter()
        counter.lines = known_lines
        position = known_offset
        while position < offset:
            chunk = await board.read_log(viewer, job_id, position, min(COUNT_READ_BYTES, offset - position))
            if not chunk:
                break
            counter.feed(chunk)
            position += len(chunk)
        self._known[job_id] = (position, counter.lines)
        self._known.move_to_end(job_id)
        while len(self._known) > self._capacity:
            self._known.popitem(last=False)
        return counter.lines


class Dashboard:
    def __init__(self, board: JobBoard, viewer_of: ViewerOf, *, site_name: str,
                 login_path: str | None = None, logout: bool = False,
                 nobody: str = "log in to see jobs") -> None:
        self.board = board
        self._nobody = nobody               # what a request without a viewer is told
        self._viewer_of = viewer_of
        self.site_name = site_name
        self._login_path = login_path
        self._logout = logout
        self._numbers = LineNumbers()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._jobs)
        app.router.add_get("/rows", self._rows)
        app.router.add_get("/events/jobs", self._jobs_events)
        app.router.add_get(f"/jobs/{{job_id:{_ID}}}", self._job)
        app.router.add_get(f"/jobs/{{job_id:{_ID}}}/events", self._job_events)
        app.router.add_get(f"/jobs/{{job_id:{_ID}}}/log/earlier", self._earlier)
        app.router.add_get(f"/jobs/{{job_id:{_ID}}}/log/raw", self._raw)
        app.router.add_post(f"/jobs/{{job_id:{_ID}}}/cancel", self._cancel)
        app.router.add_post(f"/jobs/{{job_id:{_ID}}}/replay", self._replay)
        app.router.add_get(f"/jobs/{{job_id:{_ID}}}/provenance", self._provenance)
        app.router.add_get(f"/jobs/{{job_id:{_ID}}}/outputs/{{path:.+}}", self._output)
        app.router.add_get("/static/{digest:[0-9a-f]{16}}/{name}", self._static)

    # ---------------------------------------------------------------------------- who looks

    async def _viewer(self, request: web.Request) -> Viewer:
        viewer = await self._viewer_of(request)
        if viewer is not None:
            return viewer
        if self._login_path is not None and request.method == "GET" and "text/html" in request.headers.get(
                "Accept", "text/html"):
            target = urllib.parse.urlencode({"next": request.path_qs})
            raise web.HTTPFound(f"{self._login_path}?{target}")
        raise web.HTTPUnauthorized(text=f"{self._nobody}\n")

    async def _page(self, request: web.Request, viewer: Viewer, template: str,
                    **context: object) -> web.Response:
        text = render(template, viewer=viewer, site_name=self.site_name, logout=self._logout,
                      csrf=await csrf_token(request), **context)
        return no_store(web.Response(text=text, content_type="text/html"))

    # ---------------------------------------------------------------------------- the list

    async def _query(self, request: web.Request) -> ListQuery:
        try:
            return parse_list_query({key: request.query.getall(key) for key in request.query})
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None

    async def _jobs(self, request: web.Request) -> web.Response:
        viewer = await self._viewer(request)
        query = await self._query(request)
        page = await self.board.page(viewer, query)
        return await self._page(request, viewer, "jobs.html", **self._list_context(request, query, page))

    async def _rows(self, request: web.Request) -> web.Response:
        viewer = await self._viewer(request)
        query = await self._query(request)
        page = await self.board.page(viewer, query)
        text = render("rows.html", **self._list_context(request, query, page))
        return no_store(web.Response(text=text, content_type="text/html"))

    def _list_context(self, request: web.Request, query: ListQuery, page: Page) -> dict[str, object]:
        params = [(key, value) for key, value in request.query.items() if key != "before"]
        older = urllib.parse.urlencode([*params, ("before", page.next_before or "")])
        filtered = bool(query.states or query.account or query.source or query.text)
        return {"page": page, "query": query, "states": STATES, "sources": SOURCES,
                "accounts": page.accounts, "filtered": filtered, "older_url": f"/?{older}",
                "rows_url": f"/rows?{request.query_string}", "events_url": "/events/jobs"}

    async def _jobs_events(self, request: web.Request) -> web.StreamResponse:
        await self._viewer(request)
        async with _events(request) as stream:
            while True:
                # A change, or a quiet while: then too the rows are read again, so that running
                # jobs' durations count on.
                await self.board.wait_for_jobs(HEARTBEAT_SECONDS)
                await stream.send("", event="changed")
                # However many jobs change meanwhile, the page reloads its rows once.
                await asyncio.sleep(JOBS_EVENT_SECONDS)
        return stream

    # ---------------------------------------------------------------------------- one job

    async def _detail(self, viewer: Viewer, job_id: str) -> JobDetail:
        try:
            return await self.board.detail(viewer, job_id)
        except NotVisible:
            raise web.HTTPNotFound(text=f"no job {job_id} that you may see\n") from None

    async def _job(self, request: web.Request) -> web.Response:
        viewer = await self._viewer(request)
        job_id = request.match_info["job_id"]
        job = await self._detail(viewer, job_id)
        view = await self._tail(viewer, job)
        return await self._page(
            request, viewer, "job.html", job=job, view=view, blocks=blocks_of(view.lines),
            events_url=f"/jobs/{job_id}/events", earlier_url=f"/jobs/{job_id}/log/earlier",
            raw_url=f"/jobs/{job_id}/log/raw", **await self._what_ran(viewer, job))

    async def _what_ran(self, viewer: Viewer, job: JobDetail) -> dict[str, object]:
        """What the status's "What ran" panel shows: from the job's record, once it ended (the
        status a page gets at the end carries it, so the panel comes without a reload)."""
        job_id = job.card.id
        ran: WhatRan | None = None
        if job.ended:
            record = await self.board.provenance(viewer, job_id)
            if record is not None:
                outputs = await self.board.outputs(viewer, job_id)
                ran = what_ran(record, hashlib.sha256(record).hexdigest(), outputs)
        return {"ran": ran, "provenance_url": f"/jobs/{job_id}/provenance",
                "outputs_url": f"/jobs/{job_id}/outputs",
                # A replay is asked for by whoever may cancel the job: its submitter, its admins.
                "may_replay": job.may_cancel, "replays_here": self.board.replays,
                "replay_url": f"/jobs/{job_id}/replay", "cluster": job.card.cluster}

    async def _provenance(self, request: web.Request) -> web.Response:
        viewer = await self._viewer(request)
        job_id = request.match_info["job_id"]
        try:
            record = await self.board.provenance(viewer, job_id)
        except NotVisible:
            raise web.HTTPNotFound(text=f"no job {job_id} that you may see\n") from None
        if record is None:
            raise web.HTTPNotFound(text=f"job {job_id} has no provenance record here (yet)\n")
        return no_store(web.Response(body=record, content_type="application/json", headers={
            "Content-Disposition": f'attachment; filename="{job_id}.provenance.json"',
            "X-Content-Type-Options": "nosniff"}))

    async def _output(self, request: web.Request) -> web.StreamResponse:
        viewer = await self._viewer(request)
        job_id = request.match_info["job_id"]
        path = request.match_info["path"]
        try:
            opened = await self.board.open_output(viewer, job_id, path)
        except NotVisible:
            raise web.HTTPNotFound(text=f"no job {job_id} that you may see\n") from None
        if opened is None:
            raise web.HTTPNotFound(text=f"job {job_id} has no output {path[:200]} here\n")
        return await send_output(request, opened, path)

    async def _tail(self, viewer: Viewer, job: JobDetail) -> LogView:
        """The end of the log, from a line's start, numbered as in the whole log."""
        job_id, length = job.card.id, job.log_length
        start, data = await self._whole_lines(viewer, job_id, length - TAIL_BYTES, length)
        first = await self._numbers.before(self.board, viewer, job_id, start) + 1
        reader = LogLines(first_number=first, offset=start)
        lines = reader.feed(data) + (reader.flush() if job.ended else [])
        return LogView(start, reader.consumed, first, reader.next_number, lines)

    async def _whole_lines(self, viewer: Viewer, job_id: str, start: int, end: int) -> tuple[int, bytes]:
        """The log's bytes up to `end` from the first line that starts at or after `start` (from
        the log's start when `start` is not past it): where they start, and the bytes."""
        start = max(0, start)
        data = await self._read(viewer, job_id, max(0, start - 1), end - max(0, start - 1))
        if start > 0:
            cut = data.find(b"\n")       # the byte before `start` too: a line starting at it counts
            data = data[cut + 1:] if cut >= 0 else b""
        return end - len(data), data

    async def _read(self, viewer: Viewer, job_id: str, offset: int, size: int) -> bytes:
        parts: list[bytes] = []
        while size > 0:
            chunk = await self.board.read_log(viewer, job_id, offset, min(size, COUNT_READ_BYTES))
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
        return b"".join(parts)

    async def _job_events(self, request: web.Request) -> web.StreamResponse:
        viewer = await self._viewer(request)
        job_id = request.match_info["job_id"]
        offset = _whole(request.query.get("offset"), "offset")
        number = max(1, _whole(request.query.get("number"), "number"))
        job = await self._detail(viewer, job_id)
        reader = LogLines(first_number=number, offset=offset)
        position = offset
        # The status as the page showed it is not known here: it may have changed between the
        # page's render and this stream, so the first status goes out whatever it is.
        state: tuple[str, str | None, str | None] | None = None
        async with _events(request) as stream:
            while True:
                chunk = await self.board.read_log(viewer, job_id, position, READ_BYTES)
                if chunk:
                    position += len(chunk)
                    lines = reader.feed(chunk)
                    if lines:
                        await stream.send(_lines_event(lines, reader), event="lines")
                    continue
                job = await self._detail(viewer, job_id)
                now = (job.card.state, job.card.state_reason, job.card.slurm_job_id)
                if now != state:
                    state = now
                    status = render("status.html", job=job, csrf=await csrf_token(request),
                                    **await self._what_ran(viewer, job))
                    await stream.send(status, event="status")
                if job.ended and position >= job.log_length:
                    last = reader.flush()
                    if last:
                        await stream.send(_lines_event(last, reader), event="lines")
                    await stream.send("", event="end")
                    break
                await self.board.wait_for_log(job_id, position, HEARTBEAT_SECONDS)
        return stream

    async def _earlier(self, request: web.Request) -> web.Response:
        viewer = await self._viewer(request)
        job_id = request.match_info["job_id"]
        before = _whole(request.query.get("before"), "before")
        number = max(1, _whole(request.query.get("number"), "number"))
        await self._detail(viewer, job_id)
        start, data = await self._whole_lines(viewer, job_id, before - EARLIER_BYTES, before)
        first = number - count_lines([data])
        lines = lines_of(data, first_number=first, offset=start, final=False)
        answer = {"html": render_lines(lines), "start": start, "first_number": first}
        return no_store(web.json_response(answer))

    async def _raw(self, request: web.Request) -> web.StreamResponse:
        viewer = await self._viewer(request)
        job_id = request.match_info["job_id"]
        job = await self._detail(viewer, job_id)
        response = web.StreamResponse(headers={
            "Content-Type": "application/octet-stream", "Content-Length": str(job.log_length),
            "Content-Disposition": f'attachment; filename="{job_id}.log"'})
        no_store(response)
        await response.prepare(request)
        position = 0
        while position < job.log_length:
            chunk = await self.board.read_log(viewer, job_id, position,
                                              min(COUNT_READ_BYTES, job.log_length - position))
            if not chunk:
                break
            await response.write(chunk)
            position += len(chunk)
        await response.write_eof()
        return response

    async def _posted(self, request: web.Request) -> tuple[Viewer, str]:
        """The viewer and the job of a form posted to a job's page, its CSRF token checked."""
        viewer = await self._viewer(request)
        form = await request.post()
        submitted = form.get(CSRF_FIELD)
        await check_csrf(request, submitted if isinstance(submitted, str) else None)
        return viewer, request.match_info["job_id"]

    async def _cancel(self, request: web.Request) -> web.Response:
        viewer, job_id = await self._posted(request)
        try:
            await self.board.cancel(viewer, job_id)
        except NotVisible:
            raise web.HTTPNotFound(text=f"no job {job_id} that you may see\n") from None
        except NotCancellable as exc:
            raise web.HTTPForbidden(text=f"{exc}\n") from None
        log.info("job cancel asked on the dashboard", job=job_id, viewer=viewer.name)
        raise web.HTTPSeeOther(f"/jobs/{job_id}")

    async def _replay(self, request: web.Request) -> web.Response:
        viewer, job_id = await self._posted(request)
        try:
            new_id = await self.board.replay(viewer, job_id)
        except NotVisible:
            raise web.HTTPNotFound(text=f"no job {job_id} that you may see\n") from None
        except NotCancellable as exc:
            raise web.HTTPForbidden(text=f"{exc}\n") from None
        except NotReplayable as exc:
            raise web.HTTPConflict(text=f"{exc}\n") from None
        log.info("job replay asked on the dashboard", job=job_id, replay=new_id, viewer=viewer.name)
        raise web.HTTPSeeOther(f"/jobs/{new_id}")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            body = static_file(name)
        except KeyError:
            raise web.HTTPNotFound() from None
        kind = _CONTENT_TYPES[name.rsplit(".", 1)[-1]]
        # Named by content digest: a new version has a new URL.
        return web.Response(body=body, content_type=kind,
                            headers={"Cache-Control": "public, max-age=31536000, immutable"})


async def send_output(request: web.Request, opened: OpenedOutput, path: str) -> web.StreamResponse:
    """An output file as a download: never rendered by the browser, nor its type guessed."""
    name = path.rsplit("/", 1)[-1]
    response = web.StreamResponse(headers={
        "Content-Type": "application/octet-stream", "Content-Length": str(opened.size),
        "Content-Disposition": f"attachment; filename*=UTF-8''{urllib.parse.quote(name)}",
        "X-Content-Type-Options": "nosniff"})
    no_store(response)
    try:
        await response.prepare(request)
        while chunk := await asyncio.to_thread(opened.handle.read, READ_BYTES * 4):
            await response.write(chunk)
        await response.write_eof()
    finally:
        opened.handle.close()
    return response


def _lines_event(lines: list[LogLine], reader: LogLines) -> str:
    return json.dumps({"html": render_lines(lines), "offset": reader.consumed, "number": reader.next_number})


def _whole(text: str | None, name: str) -> int:
    if text is None or not text.isdigit() or len(text) > 15:
        raise web.HTTPBadRequest(text=f"{name}: a whole number of bytes or lines is required\n")
    return int(text)


@contextlib.asynccontextmanager
async def _events(request: web.Request) -> AsyncIterator[EventSourceResponse]:
    """A server-sent events stream, closed quietly when the browser goes away."""
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    async with sse_response(request, headers=headers, ping_interval=HEARTBEAT_SECONDS) as stream:
        with contextlib.suppress(ConnectionResetError):
            yield stream
