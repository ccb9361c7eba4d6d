"""The agents' side of API jobs: lease one for a cluster, register one of their other sources,
publish a job's state, its log, its provenance record and its output files.

Agents authenticate with their agent token, as for webhook leases. What each request means is in
`jobs_protocol`; the state is in `jobstore`, used from its own thread. A publication wakes the
job's log followers; a new job or a returned lease wakes the agents waiting for a job.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from runner.gateway import jobs_protocol as protocol
from runner.gateway.access import admin_keys, member_keys, owner_keys
from runner.gateway.answers import TooLarge, agent_unauthorized, error, read_body, stopping
from runner.gateway.jobstore import Conflict, JobNotFound, JobStore, LogFull, NewJob, NotHeld
from runner.gateway.outputs import (
    MAX_RECORD_BYTES,
    OutputFiles,
    OutputRefused,
    RecordedOutput,
    check_output_path,
    find_output,
    parse_record,
)
from runner.gateway.polling import LongPolls, Stopping, Wakeups
from runner.gateway.protocol import parse_lease_seconds, parse_wait
from runner.gateway.statethread import StateThread
from runner.job import JOB_ID_PATTERN
from runner.logging_setup import get_logger
from runner.metrics import hub_leased, hub_log_received

log = get_logger("runner.gateway")

JOBS_CHANGED = "jobs"
# Any job's state, or a new job: what a list of jobs (the hub's pages) follows. Not JOBS_CHANGED,
# which wakes the agents waiting for a job to lease.
LIST_CHANGED = "jobs:list"
MAX_STATE_BODY_BYTES = 256 * 1024
# An output file is written in pieces of this size at most, each off the event loop.
_WRITE_BYTES = 1024 * 1024
_JOB_ROUTE = f"{protocol.AGENT_JOBS_PATH}/{{job_id:{JOB_ID_PATTERN.pattern}}}"

AgentHandler = Callable[[web.Request, str], Awaitable[web.Response]]


def job_changed(job_id: str) -> str:
    """The wake-up key of one job's state and log."""
    return f"job:{job_id}"


def notify_state(wakeups: Wakeups, job_id: str) -> None:
    """Wake whoever follows the job, and the lists, after a change of its state."""
    wakeups.notify(job_changed(job_id))
    wakeups.notify(LIST_CHANGED)


class AgentJobsApi:
    def __init__(self, *, jobs: StateThread[JobStore], wakeups: Wakeups, polls: LongPolls,
                 agent_of: Callable[[web.Request], str | None], public_url: str | None,
                 outputs: OutputFiles) -> None:
        self._jobs = jobs
        self._outputs = outputs
        self._public_url = public_url
        self._wakeups = wakeups
        self._polls = polls
        self._agent_of = agent_of

    def add_routes(self, app: web.Application) -> None:
        routes: tuple[tuple[str, str, AgentHandler], ...] = (
            ("POST", protocol.AGENT_LEASE_PATH, self._lease), ("GET", _JOB_ROUTE, self._show),
            ("PUT", _JOB_ROUTE, self._register), ("POST", f"{_JOB_ROUTE}/state", self._state),
            ("POST", f"{_JOB_ROUTE}/log", self._log), ("GET", protocol.AGENT_HUB_PATH, self._hub),
            ("PUT", f"{_JOB_ROUTE}/provenance", self._provenance),
            ("PUT", f"{_JOB_ROUTE}/outputs", self._output))
        for method, path, handler in routes:
            app.router.add_route(method, path, self._as_agent(handler))

    def _as_agent(self, handler: AgentHandler) -> Callable[[web.Request], Awaitable[web.Response]]:
        """`handler`, called with the agent the request's token names; 401 without one."""
        async def authenticated(request: web.Request) -> web.Response:
            agent = self._agent_of(request)
            if agent is None:
                return agent_unauthorized()
            return await handler(request, agent)
        return authenticated

    async def _hub(self, request: web.Request, agent: str) -> web.Response:
        return web.json_response(protocol.hub_info(self._public_url))

    async def _lease(self, request: web.Request, agent: str) -> web.Response:
        try:
            cluster = protocol.parse_cluster(request.query.get("cluster"))
            wait = parse_wait(request.query.get("wait"))
            seconds = parse_lease_seconds(request.query.get("seconds"))
        except ValueError as exc:
            return error(400, str(exc))
        store = self._jobs.file

        def take() -> tuple[protocol.JobLease | None, float | None]:
            leased = store.lease(agent, cluster, seconds)
            return leased, (None if leased is not None else store.next_expiry())

        async def give_back(taken: tuple[protocol.JobLease | None, float | None]) -> None:
            if taken[0] is not None:
                await self._jobs.run(store.release, taken[0].id, agent)
                self._wakeups.notify(JOBS_CHANGED)

        try:
            leased = await self._polls.wait(agent, JOBS_CHANGED, wait,
                                            lambda: self._jobs.take(take, give_back))
        except Stopping:
            return stopping()
        if leased is None:
            return web.Response(status=204)
        hub_leased("job")
        log.info("api job leased", job=leased.id, agent=agent, cluster=cluster, attempt=leased.attempt,
                 seconds=seconds)
        return web.json_response(leased.to_json())

    async def _show(self, request: web.Request, agent: str) -> web.Response:
        return await self._change(request, agent, self._jobs.file.held, changes=False)

    async def _register(self, request: web.Request, agent: str) -> web.Response:
        try:
            body = await _json_body(request, protocol.MAX_SUBMISSION_BYTES)
            registration = protocol.parse_registration(body)
        except TooLarge as exc:
            return error(413, str(exc))
        except ValueError as exc:
            return error(400, f"the job is not registered: {exc}")
        principals = registration.identity.principals()
        new = NewJob(job=registration.job, identity=registration.identity.to_json(), principals=principals,
                     owner_keys=owner_keys(principals), cluster=registration.cluster,
                     repository=registration.repository, commit=registration.commit,
                     source=registration.source, source_label=registration.source_label,
                     source_url=registration.source_url)
        job_id = request.match_info["job_id"]
        try:
            job, fresh = await self._jobs.run(self._jobs.file.register, job_id, agent, new,
                                              created=registration.created)
        except Conflict as exc:
            return error(409, str(exc))
        if fresh:
            self._wakeups.notify(LIST_CHANGED)
            log.info("agent job registered", job=job_id, agent=agent, source=registration.identity.source)
        return web.json_response(job.agent_view(), status=201 if fresh else 200)

    async def _state(self, request: web.Request, agent: str) -> web.Response:
        try:
            update = protocol.parse_state_update(await _json_body(request, MAX_STATE_BODY_BYTES))
            admin_keys(update.admins)
            member_keys(update.members)
        except TooLarge as exc:
            return error(413, str(exc))
        except ValueError as exc:
            return error(400, f"the state is not taken: {exc}")
        answer = await self._change(request, agent, self._jobs.file.publish_state, update)
        if answer.status == 200:
            self._wakeups.notify(LIST_CHANGED)
            log.info("api job state", job=request.match_info["job_id"], agent=agent, state=update.state,
                     exit_status=update.exit_status)
        return answer

    async def _log(self, request: web.Request, agent: str) -> web.Response:
        try:
            offset = protocol.parse_offset(request.query.get("offset"))
            data = await read_body(request, protocol.MAX_LOG_APPEND_BYTES)
        except ValueError as exc:
            return error(400, str(exc))
        except TooLarge as exc:
            return error(413, str(exc))
        answer = await self._change(request, agent, self._jobs.file.append_log, offset, data)
        if answer.status == 200:
            hub_log_received(len(data))
        return answer

    async def _provenance(self, request: web.Request, agent: str) -> web.Response:
        """Keep the job's record (once; a repeat of the same bytes is answered alike) and answer
        which of the outputs it names the hub holds: `{"sha256", "outputs": [{path, sha256, size,
        held}]}`."""
        job_id = request.match_info["job_id"]
        try:
            data = await read_body(request, MAX_RECORD_BYTES)
            outputs = parse_record(data)
        except TooLarge as exc:
            return error(413, f"the provenance record is refused: {exc}")
        except OutputRefused as exc:
            return error(400, f"the provenance record is refused: {exc}")
        sha256 = hashlib.sha256(data).hexdigest()
        try:
            fresh = await self._jobs.run(self._jobs.file.save_provenance, job_id, agent, data, sha256)
            held = await self._jobs.run(self._jobs.file.outputs, job_id)
        except JobNotFound:
            return error(404, f"no job {job_id}")
        except NotHeld:
            return error(409, f"this agent does not hold job {job_id}")
        except Conflict as exc:
            return error(409, str(exc))
        if fresh:
            self._wakeups.notify(job_changed(job_id))
            log.info("provenance record received", job=job_id, agent=agent, sha256=sha256,
                     outputs=len(outputs))
        return web.json_response({"sha256": sha256, "outputs": [
            {**output.to_json(), "held": held.get(output.path) == (output.sha256, output.size)}
            for output in outputs]}, status=201 if fresh else 200)

    async def _output(self, request: web.Request, agent: str) -> web.Response:
        """Take one output file the job's record names, streamed to disk and checked against the
        record's size and sha256 as it comes; 400 naming the difference otherwise."""
        job_id = request.match_info["job_id"]
        try:
            path = check_output_path(request.query.get("path", ""))
        except OutputRefused as exc:
            return error(400, str(exc))
        store = self._jobs.file
        try:
            await self._jobs.run(store.held, job_id, agent)
            record = await self._jobs.run(store.provenance, job_id)
        except JobNotFound:
            return error(404, f"no job {job_id}")
        except NotHeld:
            return error(409, f"this agent does not hold job {job_id}")
        if record is None:
            return error(409, f"job {job_id} has no provenance record at the hub yet: its outputs come "
                              "after it")
        expected = find_output(parse_record(record), path)
        if expected is None:
            return error(400, f"output {path} is refused: job {job_id}'s record names no such output")
        held = await self._jobs.run(store.outputs, job_id)
        if held.get(path) == (expected.sha256, expected.size):
            return web.json_response({**expected.to_json(), "held": True})
        if request.content_length is not None and request.content_length != expected.size:
            return error(400, f"output {path} differs from its record: {request.content_length} bytes, "
                              f"its record says {expected.size}")
        try:
            await self._receive(request, job_id, expected)
        except OutputRefused as exc:
            log.warning("output refused", job=job_id, agent=agent, path=path, reason=str(exc))
            return error(400, str(exc))
        await self._jobs.run(store.add_output, job_id, agent, path, expected.sha256, expected.size)
        self._wakeups.notify(job_changed(job_id))
        log.info("output received", job=job_id, agent=agent, path=path, size=expected.size)
        return web.json_response({**expected.to_json(), "held": True}, status=201)

    async def _receive(self, request: web.Request, job_id: str, expected: RecordedOutput) -> None:
        """The request's body into the job's output file, a piece at a time (never whole in memory)."""
        if await asyncio.to_thread(self._outputs.has, job_id, expected.sha256):
            incoming = None     # the same bytes under another path of the job: read and checked only
        else:
            incoming = await asyncio.to_thread(self._outputs.receive, job_id, expected)
        digest, size = hashlib.sha256(), 0
        try:
            piece = bytearray()
            while True:
                chunk = await request.content.read(64 * 1024)
                if chunk:
                    piece += chunk
                    size += len(chunk)
                    digest.update(chunk)
                    if size > expected.size:
                        raise OutputRefused(f"output {expected.path} is larger than the {expected.size} "
                                            "bytes its record says")
                if piece and (len(piece) >= _WRITE_BYTES or not chunk) and incoming is not None:
                    await asyncio.to_thread(incoming.write, bytes(piece))
                    piece.clear()
                if not chunk:
                    break
            if incoming is not None:
                await asyncio.to_thread(incoming.finish)
            elif (size, digest.hexdigest()) != (expected.size, expected.sha256):
                raise OutputRefused(f"output {expected.path} differs from its record: sha256 "
                                    f"{digest.hexdigest()} ({size} bytes), its record says {expected.sha256} "
                                    f"({expected.size} bytes)")
        except BaseException:
            if incoming is not None:
                await asyncio.to_thread(incoming.discard)
            raise

    async def _change(self, request: web.Request, agent: str, change: Callable[..., Any], *args: Any,
                      changes: bool = True) -> web.Response:
        """`change(job_id, agent, *args)` on the job store's thread, answered: a job (its agent's
        view) or a log's length (`{"length"}`); 404, 409 or 413 when the store refuses. What
        `changes` the job wakes its followers."""
        job_id = request.match_info["job_id"]
        try:
            done = await self._jobs.run(change, job_id, agent, *args)
        except JobNotFound:
            return error(404, f"no job {job_id}")
        except NotHeld:
            log.warning("api job not held", job=job_id, agent=agent)
            return error(409, f"this agent does not hold job {job_id}: its lease ran out and another agent "
                              "took it, or it was never leased to this agent")
        except Conflict as exc:
            return error(409, str(exc), length=exc.length)
        except LogFull as exc:
            return error(413, str(exc))
        if changes:
            self._wakeups.notify(job_changed(job_id))
        return web.json_response({"length": done} if isinstance(done, int) else done.agent_view())


async def _json_body(request: web.Request, limit: int) -> object:
    """The request's body as JSON (ValueError if it is not; TooLarge over `limit` bytes)."""
    try:
        return json.loads(await read_body(request, limit))
    except RecursionError:
        raise ValueError("the body is nested too deeply") from None
