"""The hub's REST API for jobs: submit, look, read the log, cancel, fetch the provenance record
and the output files; and the audit trail.

Every request carries an OIDC ID token of a trusted issuer (`Authorization: Bearer <token>`); the
caller is who the token says (`callers`), the body is judged in `submission`, who may see and
cancel what in `access` (as for the hub's pages), and the jobs live in `jobstore`, used from its
own thread. A job the caller may not see is answered 404, as one that does not exist: an id alone
tells nobody whether the job is there; one it may see but not cancel (a member of its account) is
answered 403 to a cancel.
A job's provenance record and its outputs are seen by whoever sees the job: the record as the
bytes its agent sent (`application/json`), the outputs as a list (path, sha256, size, URL) and each
file as an attachment that no browser renders (`gateway.outputs` keeps them).
The token is kept with the job for the agent and never appears in an answer or the log.
The audit trail (`GET /api/v1/audit`) is its accounts' admins' alone: neither a job's submitter
nor its account's members read it, and a caller naming an account it does not administer is
answered 403 naming the account. It streams as JSON lines of `runner.auditlines`, read from the
job store a batch at a time.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from runner.auditlines import json_line, parse_since
from runner.errors import InputError
from runner.gateway import jobs_protocol as protocol
from runner.gateway.access import ADMIN, NOT_CANCELLABLE, Access, access_of, caller_keys, owner_keys
from runner.gateway.agent_jobs_api import JOBS_CHANGED, LIST_CHANGED, job_changed, notify_state
from runner.gateway.answers import TooLarge, read_body
from runner.gateway.callers import Authenticate, Caller
from runner.gateway.jobstore import JobNotFound, JobStore, NewJob, StoredJob
from runner.gateway.outputs import OutputFiles, OutputRefused, check_output_path, find_output, parse_record
from runner.gateway.polling import Wakeups, wait_for_change
from runner.gateway.protocol import MAX_WAIT_SECONDS
from runner.gateway.refusal import Refusal
from runner.gateway.statethread import StateThread
from runner.gateway.submission import (
    decode_body,
    read_submission,
    settle_source,
    too_large,
)
from runner.gateway.tokens import bearer_token
from runner.job import JOB_ID_PATTERN
from runner.logging_setup import get_logger
from runner.metrics import hub_job_submitted
from runner.oidc.binding import check_job_binding
from runner.oidc.errors import TokenRejected
from runner.web.board import OpenedOutput
from runner.web.pages import send_output

log = get_logger("runner.gateway")

_JOB_ROUTE = f"{protocol.JOBS_PATH}/{{job_id:{JOB_ID_PATTERN.pattern}}}"
_FOLLOW_CHUNK_BYTES = 256 * 1024


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class JobsApi:
    def __init__(self, *, jobs: StateThread[JobStore], wakeups: Wakeups, authenticate: Authenticate,
                 public_url: str, outputs: OutputFiles) -> None:
        self._jobs = jobs
        self._outputs = outputs
        self._wakeups = wakeups
        self._authenticate = authenticate
        self._public_url = public_url

    def add_routes(self, app: web.Application) -> None:
        routes: tuple[tuple[str, str, Handler], ...] = (
            ("POST", protocol.JOBS_PATH, self._submit), ("GET", protocol.JOBS_PATH, self._list),
            ("GET", _JOB_ROUTE, self._show), ("DELETE", _JOB_ROUTE, self._cancel),
            ("GET", f"{_JOB_ROUTE}/log", self._log), ("GET", protocol.AUDIT_PATH, self._audit),
            ("GET", f"{_JOB_ROUTE}/provenance", self._provenance),
            ("GET", f"{_JOB_ROUTE}/outputs", self._outputs_list),
            ("GET", f"{_JOB_ROUTE}/outputs/{{path:.+}}", self._output))
        for method, path, handler in routes:
            app.router.add_route(method, path, _answering(handler))

    # --- who asks ---

    async def _caller(self, request: web.Request) -> Caller:
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            raise Refusal(401, "an OIDC ID token of a trusted issuer is required "
                               "(Authorization: Bearer <token>)")
        return await self._authenticate(token)

    async def _visible_job(self, request: web.Request) -> tuple[Caller, StoredJob, Access]:
        """The caller, the job of the path and what the caller may do with it, if it may see it
        (a Refusal otherwise)."""
        caller = await self._caller(request)
        job_id = request.match_info["job_id"]
        job = await self._jobs.run(self._jobs.file.get, job_id)
        access = Access.NONE if job is None else access_of(job.access, caller_keys(caller.principals))
        if job is None or access is Access.NONE:
            raise Refusal(404, f"no job {job_id} that this token may see")
        return caller, job, access

    # --- requests ---

    async def _submit(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > protocol.MAX_SUBMISSION_BYTES:
            raise too_large(request.content_length)
        try:
            body = await read_body(request, protocol.MAX_SUBMISSION_BYTES)
        except TooLarge:
            raise too_large() from None
        caller = await self._caller(request)
        data = decode_body(body)
        if isinstance(data.get("job"), dict):
            # A digest-bound token is good for its one job: judged before anything else of it.
            check_job_binding(caller.audience, caller.configured_audience, data["job"])
        submission = read_submission(data)
        repository, commit = settle_source(submission, token_repository=caller.repository,
                                           token_commit=caller.commit)
        owners = owner_keys(caller.principals)
        if not owners:
            raise Refusal(403, "the token names no repository, pipeline, project or user that could own "
                               "the job")
        new = NewJob(job=submission.job, identity=caller.identity, principals=caller.principals,
                     owner_keys=owners, issuer=caller.issuer, token=caller.token,
                     cluster=submission.cluster, repository=repository, commit=commit)
        job = await self._jobs.run(self._jobs.file.submit, new)
        hub_job_submitted()
        self._wakeups.notify(JOBS_CHANGED)
        self._wakeups.notify(LIST_CHANGED)
        log.info("api job queued", job=job.id, issuer=caller.issuer, owners=list(new.owner_keys),
                 cluster=job.cluster, repository=job.repository, commit=job.commit, name=submission.spec.name)
        url = protocol.job_url(self._public_url, job.id)
        return web.json_response({"id": job.id, "url": url, "state": job.state}, status=201,
                                 headers={"Location": protocol.job_path(job.id)})

    async def _list(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        try:
            limit = protocol.parse_limit(request.query.get("limit"))
            before = request.query.get("before")
            if before is not None and not JOB_ID_PATTERN.fullmatch(before):
                raise ValueError(f"before must be a job id, got {before[:80]!r}")
            jobs = await self._jobs.run(self._jobs.file.visible, caller_keys(caller.principals),
                                        limit=limit, before=before)
        except ValueError as exc:
            raise Refusal(400, str(exc)) from None
        except JobNotFound:
            raise Refusal(400, f"before: no job {before}", "before") from None
        following = jobs[-1].id if len(jobs) == limit else None
        return web.json_response({"jobs": [job.view(self._public_url) for job in jobs], "next": following})

    async def _show(self, request: web.Request) -> web.Response:
        _, job, _ = await self._visible_job(request)
        return web.json_response(job.view(self._public_url))

    async def _cancel(self, request: web.Request) -> web.Response:
        caller, job, access = await self._visible_job(request)
        if access is not Access.CANCEL:
            raise Refusal(403, NOT_CANCELLABLE.format(job_id=job.id))
        job = await cancel_job(self._jobs, self._wakeups, job.id, caller.actor)
        log.info("api job cancel requested", job=job.id, issuer=caller.issuer, state=job.state)
        return web.json_response(job.view(self._public_url), status=202)

    async def _log(self, request: web.Request) -> web.StreamResponse:
        _, job, _ = await self._visible_job(request)
        try:
            offset = protocol.parse_offset(request.query.get("offset"))
            follow = protocol.parse_flag(request.query.get("follow"), name="follow")
        except ValueError as exc:
            raise Refusal(400, str(exc)) from None
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                               "Cache-Control": "no-store"})
        await response.prepare(request)
        store = self._jobs.file
        while not self._wakeups.stopping:
            changed = self._wakeups.event(job_changed(job.id))   # taken before looking
            current = await self._jobs.run(store.get, job.id)
            assert current is not None
            if offset < current.log_length:
                size = min(current.log_length - offset, _FOLLOW_CHUNK_BYTES)
                data = await self._jobs.run(store.read_log, job.id, offset, size)
                await response.write(data)
                offset += len(data)
                continue
            if not follow or current.ended_for_good:
                break
            await wait_for_change(changed, MAX_WAIT_SECONDS)
        await response.write_eof()
        return response

    async def _provenance(self, request: web.Request) -> web.Response:
        _, job, _ = await self._visible_job(request)
        record = await self._jobs.run(self._jobs.file.provenance, job.id)
        if record is None:
            raise Refusal(404, f"job {job.id} has no provenance record at the hub (yet): a job has one "
                               "once it ran and ended, and its agent sends it before its final state")
        return web.Response(body=record, content_type="application/json",
                            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    async def _outputs_list(self, request: web.Request) -> web.Response:
        _, job, _ = await self._visible_job(request)
        listed = await output_list(self._jobs, job.id, protocol.job_path(job.id))
        return web.json_response({"outputs": listed}, headers={"Cache-Control": "no-store"})

    async def _output(self, request: web.Request) -> web.StreamResponse:
        _, job, _ = await self._visible_job(request)
        path = request.match_info["path"]
        opened = await open_output(self._jobs, self._outputs, job.id, path)
        if opened is None:
            raise Refusal(404, f"job {job.id} has no output {path[:200]!r} at the hub")
        return await send_output(request, opened, path)

    async def _audit(self, request: web.Request) -> web.StreamResponse:
        caller = await self._caller(request)
        keys = caller_keys(caller.principals)
        query = request.query
        for name in query:
            if name not in protocol.AUDIT_QUERY:
                raise Refusal(400, f"unknown parameter {name[:40]!r}: the audit trail takes "
                                   f"{', '.join(protocol.AUDIT_QUERY)}", name[:40])
        account, job_id, since_text = query.get("account"), query.get("job"), query.get("since")
        try:
            since = None if since_text is None else parse_since(since_text, name="since")
        except InputError as exc:
            raise Refusal(400, str(exc), "since") from None
        try:
            after = protocol.parse_offset(query.get("after"), name="after")
        except ValueError as exc:
            raise Refusal(400, str(exc), "after") from None
        if job_id is not None:
            await self._check_job_admin(job_id, keys)
        if account is not None:
            if not await self._jobs.run(self._jobs.file.administers, keys, account):
                raise Refusal(403, f"this token is no admin of account {account!r}: only an account's "
                                   "admins may read its audit trail", "account")
        elif not await self._jobs.run(self._jobs.file.administers, keys):
            raise Refusal(403, "only an account's admins may read the audit trail, and this token is "
                               "the admin of no account at this hub")
        response = web.StreamResponse(headers={"Content-Type": protocol.AUDIT_CONTENT_TYPE,
                                               "Cache-Control": "no-store"})
        await response.prepare(request)
        store = self._jobs.file
        while True:
            page = await self._jobs.run(store.audit_trail, keys, after=after, limit=protocol.AUDIT_BATCH,
                                        account=account, job_id=job_id, since=since)
            if page:
                await response.write("".join(json_line(item) for item in page).encode())
                after = page[-1]["seq"]
            if len(page) < protocol.AUDIT_BATCH or self._wakeups.stopping:
                break
        await response.write_eof()
        log.info("audit trail read", issuer=caller.issuer, actor=caller.actor, account=account, job=job_id,
                 since=since_text, last_seq=after)
        return response

    async def _check_job_admin(self, job_id: str, keys: tuple[str, ...]) -> None:
        """Refuse a job the caller may not see (404, as anywhere in the API) or does not administer."""
        if not JOB_ID_PATTERN.fullmatch(job_id):
            raise Refusal(400, f"job must be a job id, got {job_id[:80]!r}", "job")
        job = await self._jobs.run(self._jobs.file.get, job_id)
        if job is None or access_of(job.access, keys) is Access.NONE:
            raise Refusal(404, f"no job {job_id} that this token may see", "job")
        if not any(role == ADMIN and key in keys for role, key in job.access):
            raise Refusal(403, f"only the admins of job {job_id}'s account may read its audit trail", "job")


async def cancel_job(jobs: StateThread[JobStore], wakeups: Wakeups, job_id: str, actor: str) -> StoredJob:
    """Ask for the job's cancel as `actor` (a queued job nobody holds ends at once) and wake its
    followers: its agent learns of it when it next asks. Whether the caller may is the caller's
    to check."""
    job = await jobs.run(jobs.file.request_cancel, job_id, actor)
    notify_state(wakeups, job.id)
    return job


async def output_list(jobs: StateThread[JobStore], job_id: str, base: str) -> list[dict[str, Any]]:
    """The outputs the job's record names: path, sha256, size, and `url` (`base`/outputs/PATH) for
    each the hub holds (null for one it does not hold, yet or ever)."""
    record = await jobs.run(jobs.file.provenance, job_id)
    if record is None:
        return []
    held = await jobs.run(jobs.file.outputs, job_id)
    return [{**output.to_json(),
             "url": f"{base}/outputs/{urllib.parse.quote(output.path)}"
             if held.get(output.path) == (output.sha256, output.size) else None}
            for output in parse_record(record)]


async def open_output(jobs: StateThread[JobStore], files: OutputFiles, job_id: str,
                      path: str) -> OpenedOutput | None:
    """The file of the job's output `path` (open, and its size), if its record names it and the hub
    holds it."""
    try:
        check_output_path(path)
    except OutputRefused:
        return None
    record = await jobs.run(jobs.file.provenance, job_id)
    output = None if record is None else find_output(parse_record(record), path)
    held = await jobs.run(jobs.file.outputs, job_id)
    if output is None or held.get(path) != (output.sha256, output.size):
        return None
    try:
        handle = await asyncio.to_thread(files.open, job_id, output.sha256)
    except FileNotFoundError:
        return None
    return OpenedOutput(handle, output.size)


def _answering(handler: Handler) -> Handler:
    """`handler`, its refusals answered (and logged): a token the verifier or a job's digest
    refused is 401, with a challenge."""
    async def answered(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except TokenRejected as rejected:
            refused = Refusal(401, rejected.reason)
        except Refusal as refusal:
            refused = refusal
        log.warning("api request refused", method=request.method, path=request.path, status=refused.status,
                    reason=refused.message, remote=request.remote)
        headers = ({"WWW-Authenticate": 'Bearer realm="hpc-runner hub", error="invalid_token"'}
                   if refused.status == 401 else None)
        return web.json_response(refused.body(), status=refused.status, headers=headers)
    return answered
