"""The jobs API's reads over any `JobBoard`: the same answers, in the same shapes, as the hub's API
gives (`runner.gateway.jobs_api`), for whoever holds the jobs (an agent on its own socket).

    GET /api/v1/jobs?limit=N&before=ID        -> {"jobs": [<job view>...], "next": ID | null}
    GET /api/v1/jobs/ID                       -> <job view>
    GET /api/v1/jobs/ID/log?offset=N&follow=1 -> the log's bytes from N (with follow, until the job ends)
    GET /api/v1/jobs/ID/provenance            -> its provenance record, byte for byte (application/json)
    GET /api/v1/jobs/ID/outputs               -> {"outputs": [{"path", "sha256", "size", "url"}...]}
    GET /api/v1/jobs/ID/outputs/PATH          -> the output file (an attachment)

A job view holds `VIEW_FIELDS`; its `url` is the job's page (`base_url` + /jobs/ID). Who asks is
`viewer_of`'s to say; a job the viewer may not see is 404, as one that does not exist. Refusals
are `{"error": ...}`, as the hub's.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from runner.job import JOB_ID_PATTERN
from runner.web.board import JobBoard, JobDetail, ListQuery, NotVisible, Viewer
from runner.web.pages import send_output
from runner.web.security import no_store

ViewerOf = Callable[[web.Request], Awaitable[Viewer | None]]

JOBS_PATH = "/api/v1/jobs"
JOB_PAGE_PATH = "/jobs"
VIEW_FIELDS = ("id", "state", "exit_status", "reasons", "cluster", "account", "grant", "slurm_job_id",
               "created", "started", "ended", "url")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# What one read of the log takes; a follower writes each piece as it comes.
READ_BYTES = 256 * 1024
# A follower waits this long at most for the log to grow before it looks at the job again.
WAIT_SECONDS = 15.0

_ID = JOB_ID_PATTERN.pattern


def format_time(epoch: float) -> str:
    """UTC in RFC 3339, to the millisecond, as the hub writes times."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_view(job: JobDetail, base_url: str = "") -> dict[str, Any]:
    """What `GET /api/v1/jobs/ID` answers of a job."""
    card = job.card

    def time_or_none(value: float | None) -> str | None:
        return None if value is None else format_time(value)

    return {"id": card.id, "state": card.state, "exit_status": job.exit_status, "reasons": list(job.reasons),
            "cluster": card.cluster, "account": card.account, "grant": job.grant,
            "slurm_job_id": card.slurm_job_id, "created": format_time(card.created),
            "started": time_or_none(card.started), "ended": time_or_none(card.ended),
            "url": f"{base_url.rstrip('/')}{JOB_PAGE_PATH}/{card.id}"}


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ReadApi:
    def __init__(self, board: JobBoard, viewer_of: ViewerOf, *, base_url: str = "") -> None:
        self.board = board
        self._viewer_of = viewer_of
        self._base_url = base_url

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(JOBS_PATH, _answering(self._list))
        app.router.add_get(f"{JOBS_PATH}/{{job_id:{_ID}}}", _answering(self._show))
        app.router.add_get(f"{JOBS_PATH}/{{job_id:{_ID}}}/log", _answering(self._log))
        app.router.add_get(f"{JOBS_PATH}/{{job_id:{_ID}}}/provenance", _answering(self._provenance))
        app.router.add_get(f"{JOBS_PATH}/{{job_id:{_ID}}}/outputs", _answering(self._outputs))
        app.router.add_get(f"{JOBS_PATH}/{{job_id:{_ID}}}/outputs/{{path:.+}}", _answering(self._output))

    async def _viewer(self, request: web.Request) -> Viewer:
        viewer = await self._viewer_of(request)
        if viewer is None:
            raise Refused(401, "who is asking is not known")
        return viewer

    async def _detail(self, viewer: Viewer, job_id: str) -> JobDetail:
        try:
            return await self.board.detail(viewer, job_id)
        except NotVisible:
            raise Refused(404, f"no job {job_id} that you may see") from None

    async def _list(self, request: web.Request) -> web.Response:
        viewer = await self._viewer(request)
        limit = _limit(request.query.get("limit"))
        before = request.query.get("before") or None
        if before is not None and not JOB_ID_PATTERN.fullmatch(before):
            raise Refused(400, f"before must be a job id, got {before[:80]!r}")
        page = await self.board.page(viewer, ListQuery(before=before, limit=limit))
        views = []
        for card in page.cards[:limit]:
            try:
                views.append(job_view(await self.board.detail(viewer, card.id), self._base_url))
            except NotVisible:  # no longer (the policy changed meanwhile)
                continue
        return no_store(web.json_response({"jobs": views, "next": page.next_before}))

    async def _show(self, request: web.Request) -> web.Response:
        viewer = await self._viewer(request)
        job = await self._detail(viewer, request.match_info["job_id"])
        return no_store(web.json_response(job_view(job, self._base_url)))

    async def _log(self, request: web.Request) -> web.StreamResponse:
        viewer = await self._viewer(request)
        job_id = request.match_info["job_id"]
        await self._detail(viewer, job_id)
        offset = _offset(request.query.get("offset"))
        follow = _flag(request.query.get("follow"), "follow")
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        no_store(response)
        await response.prepare(request)
        try:
            offset = await self._copy(viewer, job_id, offset, response)
            while follow:
                # Whether it ended is asked after the log was read to its end: what it wrote
                # before it ended is then all in the file, and read once more below.
                job = await self.board.detail(viewer, job_id)
                if job.ended:
                    await self._copy(viewer, job_id, offset, response)
                    break
                await self.board.wait_for_log(job_id, offset, WAIT_SECONDS)
                offset = await self._copy(viewer, job_id, offset, response)
        except NotVisible:  # no longer (the policy changed meanwhile): the answer ends here
            pass
        await response.write_eof()
        return response

    async def _provenance(self, request: web.Request) -> web.Response:
        viewer = await self._viewer(request)
        job_id = request.match_info["job_id"]
        try:
            record = await self.board.provenance(viewer, job_id)
        except NotVisible:
            raise Refused(404, f"no job {job_id} that you may see") from None
        if record is None:
            raise Refused(404, f"job {job_id} has no provenance record (yet): a job has one once it ran and "
                               "ended")
        return no_store(web.Response(body=record, content_type="application/json",
                                     headers={"X-Content-Type-Options": "nosniff"}))

    async def _outputs(self, request: web.Request) -> web.Response:
        viewer = await self._viewer(request)
        job_id = request.match_info["job_id"]
        try:
            outputs = await self.board.outputs(viewer, job_id)
        except NotVisible:
            raise Refused(404, f"no job {job_id} that you may see") from None
        base = f"{JOBS_PATH}/{job_id}/outputs"
        return no_store(web.json_response({"outputs": [
            {"path": output.path, "sha256": output.sha256, "size": output.size,
             "url": f"{base}/{urllib.parse.quote(output.path)}" if output.available else None}
            for output in outputs]}))

    async def _output(self, request: web.Request) -> web.StreamResponse:
        viewer = await self._viewer(request)
        job_id, path = request.match_info["job_id"], request.match_info["path"]
        try:
            opened = await self.board.open_output(viewer, job_id, path)
        except NotVisible:
            raise Refused(404, f"no job {job_id} that you may see") from None
        if opened is None:
            raise Refused(404, f"job {job_id} has no output {path[:200]!r} here")
        return await send_output(request, opened, path)

    async def _copy(self, viewer: Viewer, job_id: str, offset: int, response: web.StreamResponse) -> int:
        """The log from `offset` to its present end, written; where it ended."""
        while True:
            data = await self.board.read_log(viewer, job_id, offset, READ_BYTES)
            if not data:
                return offset
            await response.write(data)
            offset += len(data)


def _answering(handler: Handler) -> Handler:
    async def answered(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Refused as refused:
            return no_store(web.json_response({"error": refused.message}, status=refused.status))
    return answered


def _limit(value: str | None) -> int:
    if value is None or value == "":
        return DEFAULT_PAGE_SIZE
    if not value.isascii() or not value.isdigit() or not 1 <= int(value[:6]) <= MAX_PAGE_SIZE:
        raise Refused(400, f"limit must be a whole number from 1 to {MAX_PAGE_SIZE}, got {value[:40]!r}")
    return int(value)


def _offset(value: str | None) -> int:
    if value is None or value == "":
        return 0
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        raise Refused(400, f"offset must be a whole number of bytes, got {value[:40]!r}")
    return int(value)


def _flag(value: str | None, name: str) -> bool:
    if value in (None, "", "0", "false"):
        return False
    if value in ("1", "true"):
        return True
    raise Refused(400, f"{name} must be 1 or 0, got {(value or '')[:40]!r}")
