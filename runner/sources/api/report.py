"""What the hub is told of an API job: each change of its state, in order, and its log, byte-exact.

The log goes to the hub as the agent's job writes it (the sink `JobHost.run` feeds), from the
offset the hub acknowledged last, with the job's secrets (the values of its environment that the
redaction patterns name) masked in place, byte for byte, so that offsets stay the log file's.
The hub keeps a log as bytes at offsets: an append that repeats bytes it holds changes nothing,
and one past its end is refused with the length it holds. So after a restart of either side the
agent starts from the hub's length (`AgentView.log_length`), and whatever the hub lacks before a
chunk (it was restored from an older copy, say) is read again from the job's log file. A job's
final state goes out after the whole log, so whoever follows the log at the hub until the job
ends has all of it.

States are published as the agent records them (`on_change`), one after another; each carries the
policy's decision (account, grant, the account's admins, who may see and cancel the job at the
hub, and its members, the principals of the grants that spend it, who may see it), why a waiting
job waits (Slurm's reason while it pends there), the Slurm job id once there is one and the nodes
it was given, and at the end the exit status and why it ended. A change of the reason or of the
nodes is published like a change of state (the lifecycle's watchers hear of both). A hub
out of reach is tried again with a growing pause: nothing is dropped, the job runs on meanwhile.

A job that ran has a provenance record in the agent's store when it ends, and the outputs it names
in its directory (`outputs/`). Both go to the hub after the log and before the final state, so
whoever sees the job ended at the hub finds them there: the record first (its answer says which
files the hub holds already, so a restart of either side sends only the others), then each file,
streamed and opened without following links. They never hold the final state back for ever: a
refusal (the record too large, a file that changed since its record) is logged and the final state
goes without what was refused; a hub that has not taken it all within `HAND_OVER_SECONDS`, and the
time its files take at the slowest upload waited for (out of reach, or failing), gets the final
state without the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from runner.gateway.jobs_protocol import (
    MAX_MEMBERS,
    MAX_NODE_LIST_CHARS,
    MAX_REASON_CHARS,
    MAX_REASONS,
    MAX_STATE_REASON_CHARS,
    state_body,
)
from runner.gateway.outputs import OutputRefused, check_output_path
from runner.job import OUTPUTS_DIR, JobRecord, JobState
from runner.job.waiting import waiting_reason
from runner.logging_setup import get_logger
from runner.logs.redact import read_masked, secret_needles, secret_values
from runner.logs.tail import pump
from runner.policy import Policy
from runner.provenance.outputs import open_under
from runner.sources import Ended
from runner.sources.api.client import UPLOAD_BYTES_PER_SECOND, HeldOutput, HubClient, HubRefused
from runner.sources.api.published import agent_record
from runner.sources.github.gateway_client import GatewayError

log = get_logger("runner.sources.api")

# How often the hub is asked whether a running job's cancel was asked for.
CANCEL_POLL_SECONDS = 5.0

# What one append carries at most when the hub lacks a stretch of the log (well under its limit).
PIECE_BYTES = 1024 * 1024
# How often the acknowledged offset is written to the state file while a job runs: the hub's own
# length is what a restart resumes from, the kept offset is for when the hub cannot be asked.
KEEP_OFFSET_SECONDS = 1.0
# How long a job's record and outputs may hold back its final state while the hub does not take
# them (out of reach or failing), beside the time their files take at the slowest upload waited
# for (`UPLOAD_BYTES_PER_SECOND`): then the final state goes without what is left.
HAND_OVER_SECONDS = 600.0

# Reads the agent's provenance record of a job (by the agent's job id).
RecordReader = Callable[[str], bytes | None]


def state_fields(record: JobRecord, policy: Policy) -> dict[str, Any]:
    """What the hub is told with the job's state, from the agent's record of it."""
    decision = record.decision or {}
    account = decision.get("account")
    fields: dict[str, Any] = {
        "account": account, "grant": decision.get("grant"),
        "admins": [str(pattern) for pattern in policy.admins_of(account)] if account else [],
        "members": members_of(policy, account) if account else [],
        "slurm_job_id": record.slurm_id,
        "state_reason": _bounded(waiting_reason(record), MAX_STATE_REASON_CHARS),
        "node_list": _bounded(record.node_list, MAX_NODE_LIST_CHARS),
    }
    if record.state.is_terminal:
        exit_status = record.exit_status
        fields["exit_status"] = exit_status if exit_status is not None and 0 <= exit_status <= 255 else None
        fields["reasons"] = _reasons(record)
        if record.finished_at is not None:
            fields["ended"] = record.finished_at
    return fields


def _bounded(text: str | None, most: int) -> str | None:
    return None if text is None else text[:most]


def members_of(policy: Policy, account: str) -> list[str]:
    """The principal patterns of the grants that spend `account`: who may see its jobs at the hub.
    Past the protocol's bound the rest are left out (fewer see the job, never more)."""
    patterns = {str(pattern) for grant in policy.grants if grant.account == account
                for pattern in grant.principals}
    return sorted(patterns)[:MAX_MEMBERS]


def _reasons(record: JobRecord) -> list[str]:
    """Why a job ended as it did: every reason of a denial, else what the agent said of its end."""
    decision = record.decision or {}
    if record.state == JobState.denied and decision.get("allowed") is False:
        found = [str(reason) for reason in decision.get("reasons") or []]
    elif record.state != JobState.succeeded and record.outcome_detail:
        found = [record.outcome_detail]
    else:
        found = []
    return [reason[:MAX_REASON_CHARS] for reason in found if reason][:MAX_REASONS]


async def end_unrun(client: HubClient, hub_id: str, *, state: str, reason: str, line: str) -> None:
    """End a job this agent will not run (it was never admitted) in `state`: `line` is its log and
    `reason` its state's. A job another agent holds meanwhile is left to that agent."""
    try:
        await client.retrying(lambda: client.append_log(hub_id, 0, line.encode()), "the job's log")
    except HubRefused as refused:
        log.warning("the hub did not take the job's log", job=hub_id, error=str(refused))
    try:
        await client.retrying(lambda: client.publish(hub_id, state, reasons=[reason[:MAX_REASON_CHARS]]),
                       "the job's state")
    except HubRefused as refused:
        log.warning("the hub did not take the job's state", job=hub_id, state=state, error=str(refused))


class ReportedJob(Protocol):
    """A job as the hub knows it: its id there and how much of its log the hub acknowledged (an API
    job of this source, or a job of another source the hub publisher registered)."""

    hub_id: str
    log_offset: int


class OffsetKeeper(Protocol):
    """Where the acknowledged offset of a reported job's log is kept across restarts."""

    def keep_offset(self, hub_id: str, offset: int) -> None: ...


class HubReport:
    """The hub's view of one job this agent runs: its states and its log (see the module docstring)."""

    def __init__(self, client: HubClient, job: ReportedJob, *, state: OffsetKeeper, log_path: Path,
                 policy: Callable[[], Policy], secrets: Sequence[str] = (),
                 records: RecordReader | None = None, hand_over_seconds: float | None = None) -> None:
        self.client = client
        self._records = records if records is not None else _records_beside(state)
        self.hand_over_seconds = hand_over_seconds
        # The job's secrets (its environment's values the redaction patterns name) never reach the
        # hub: masked in place, so the hub's log keeps the job's offsets (see `_masked`).
        self._needles = secret_needles(secrets)
        self._final = False                     # the job ended: nothing more comes after the log
        self.job = job
        self.state = state
        self.log_path = log_path
        self._policy = policy
        self.acknowledged = job.log_offset      # how much of the log the hub holds, as last heard
        self.broken: str | None = None          # why the log is no longer sent, if it is not
        self._kept_at = 0.0
        self._publishing: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------------------- where the hub is

    async def catch_up(self) -> bool:
        """Start from what the hub holds of the log; whether the hub asks for the job's cancel."""
        try:
            view = await self.client.retrying(lambda: self.client.show(self.job.hub_id), "the job at the hub")
        except HubRefused as refused:
            log.warning("the hub does not show this agent the job", job=self.job.hub_id, error=str(refused))
            return False
        self.acknowledged = view.log_length
        return view.cancel_requested

    # ---------------------------------------------------------------------------- states

    def on_change(self, record: JobRecord) -> None:
        """A new state of the job (`JobHost.run`'s `on_change`): published after those before it.
        A final state waits for the whole log (`conclude`)."""
        if record.state.is_terminal:
            return
        previous = self._publishing
        self._publishing = asyncio.ensure_future(self._publish_after(previous, record))

    async def _publish_after(self, previous: asyncio.Task[None] | None, record: JobRecord) -> None:
        if previous is not None:
            with contextlib.suppress(Exception):
                await previous
        await self._publish(record.state.value, record)

    async def _publish(self, state: str, record: JobRecord) -> None:
        fields = state_fields(record, self._policy())
        try:
            state_body(state, **fields)
        except ValueError as exc:   # a value the hub would refuse (a Slurm id of another form, say)
            log.warning("the job's state is published without its details", job=self.job.hub_id,
                        error=str(exc))
            fields = {}
        try:
            await self.client.retrying(lambda: self.client.publish(self.job.hub_id, state, **fields),
                                       "the job's state")
        except HubRefused as refused:
            if state == JobState.expired.value and refused.status == 400:
                # A hub older than this agent knows no `expired`: it ends the job as cancelled,
                # its reasons saying it expired, rather than leaving it open for good.
                log.warning("the hub knows no expired state; published as cancelled", job=self.job.hub_id)
                await self._publish(JobState.cancelled.value, record)
                return
            log.error("the hub refused the job's state", job=self.job.hub_id, state=state, error=str(refused))

    async def conclude(self, ended: Ended, record: JobRecord) -> None:
        """The rest of the log, then the final state, once every earlier state went out."""
        self._final = True
        await self.send_log()
        if self._publishing is not None:
            with contextlib.suppress(Exception):
                await self._publishing
        await self.hand_over(record)
        await self._publish(ended.state.value, record)
        self.keep(force=True)

    # ---------------------------------------------------------------------------- record and outputs

    async def hand_over(self, record: JobRecord) -> None:
        """The job's provenance record and its outputs to the hub, if it has a record; bounded (see
        the module docstring)."""
        data = None if self._records is None else await asyncio.to_thread(self._records, record.id)
        if data is None:
            return
        seconds = HAND_OVER_SECONDS if self.hand_over_seconds is None else self.hand_over_seconds
        try:
            async with asyncio.timeout(seconds) as deadline:
                await self._hand_over(record, data, deadline)
        except TimeoutError:
            log.error("the hub did not take the job's provenance record and outputs in time; its final "
                      "state goes without what is left", job=self.job.hub_id, seconds=seconds)
        except HubRefused as refused:
            log.error("the hub refused the job's provenance record; its final state goes without it and "
                      "its outputs", job=self.job.hub_id, error=str(refused))

    async def _hand_over(self, record: JobRecord, data: bytes, deadline: asyncio.Timeout) -> None:
        hub_id = self.job.hub_id
        held = await self.client.retrying(lambda: self.client.put_provenance(hub_id, data),
                                          "the job's provenance record")
        missing = sum(output.size for output in held if not output.held)
        when = deadline.when()
        if when is not None:
            deadline.reschedule(when + missing / UPLOAD_BYTES_PER_SECOND)
        directory = self.log_path.parent / OUTPUTS_DIR
        sent = 0
        for output in held:
            if output.held:
                continue
            try:
                await self.client.retrying(functools.partial(self._put_output, directory, output),
                                           f"output {output.path}")
                sent += 1
            except HubRefused as refused:
                log.error("the hub refused an output of the job", job=hub_id, path=output.path,
                          error=str(refused))
            except OSError as exc:
                log.error("an output of the job cannot be read; it is not sent to the hub", job=hub_id,
                          path=output.path, error=str(exc))
        log.info("provenance record and outputs at the hub", job=hub_id, outputs=len(held), sent=sent)

    async def _put_output(self, directory: Path, output: HeldOutput) -> None:
        handle = await asyncio.to_thread(_open_output, directory, output.path)
        try:
            await self.client.put_output(self.job.hub_id, output.path, handle, output.size)
        finally:
            handle.close()

    # ---------------------------------------------------------------------------- the log

    async def sink(self, offset: int, data: bytes) -> None:
        """The job's log from `offset` (`JobHost.run`'s sink): to the hub, nothing lost or repeated."""
        if data:
            await self._deliver(offset, data)
            self.keep()

    async def send_log(self) -> None:
        """Whatever of the job's log file the hub does not hold yet (a job that never ran)."""
        await pump(self.log_path, offset=self.acknowledged, done=lambda: True, sink=self.sink)

    async def _deliver(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        while self.acknowledged < end and self.broken is None:
            start = self.acknowledged
            if start < offset:
                # The hub lacks what comes before this chunk: the job's log file still has it.
                size = min(offset - start, PIECE_BYTES)
                piece = await asyncio.to_thread(_read_range, self.log_path, start, size)
                if not piece:
                    self._give_up(f"the job's log file ends before byte {offset}")
                    return
            else:
                piece = data[start - offset:start - offset + PIECE_BYTES]
            if self._needles:
                piece = await asyncio.to_thread(self._masked, start, piece)
                if not piece:
                    return      # what is left may begin a secret: it goes with what follows it
            try:
                self.acknowledged = await self.client.retrying(
                    functools.partial(self.client.append_log, self.job.hub_id, start, piece), "the job's log")
            except HubRefused as refused:
                if refused.length is not None and refused.length < start:
                    self.acknowledged = refused.length      # the hub holds less than it said before
                    continue
                self._give_up(str(refused))

    def _give_up(self, why: str) -> None:
        self.broken = why
        log.error("the job's log is no longer sent to the hub", job=self.job.hub_id, reason=why,
                  acknowledged=self.acknowledged)

    def keep(self, *, force: bool = False) -> None:
        """Remember how much of the log the hub holds (at most every KEEP_OFFSET_SECONDS)."""
        now = time.monotonic()
        due = force or now - self._kept_at >= KEEP_OFFSET_SECONDS
        if self.acknowledged == self.job.log_offset or not due:
            return
        self._kept_at = now
        self.job.log_offset = self.acknowledged
        self.state.keep_offset(self.job.hub_id, self.acknowledged)

    # ---------------------------------------------------------------------------- cancel

    async def watch_cancel(self, cancel: asyncio.Event, interval: float,
                           on_cancel: Callable[[], None]) -> None:
        """Ask the hub every `interval` seconds whether the job's cancel was asked for; then call
        `on_cancel` and set `cancel`. A hub out of reach is asked again at the next turn."""
        while not cancel.is_set():
            try:
                view = await self.client.show(self.job.hub_id)
            except GatewayError as exc:
                log.info("cannot ask the hub whether the job is cancelled", job=self.job.hub_id,
                         error=str(exc))
            except HubRefused as refused:
                log.warning("the hub no longer shows the job to this agent", job=self.job.hub_id,
                            error=str(refused))
                return
            else:
                if view.cancel_requested:
                    on_cancel()
                    cancel.set()
                    return
            await asyncio.sleep(interval)


    def _masked(self, start: int, piece: bytes) -> bytes:
        """`piece` (the log file's bytes from `start`) with the job's secrets masked; while the job
        runs, without a tail that may begin a secret the file does not hold the rest of yet."""
        return read_masked(functools.partial(_read_range, self.log_path), start, len(piece), self._needles,
                           final=self._final)


def job_secrets(record: JobRecord | None, patterns: Sequence[str] = ()) -> list[str]:
    """The values of the job's environment whose names the redaction patterns name (the defaults,
    and `patterns`): what its log must not carry to the hub."""
    env = (record.spec.get("env") if record is not None else None) or {}
    return secret_values({str(k): str(v) for k, v in env.items()}, patterns) if isinstance(env, dict) else []


def _records_beside(state: OffsetKeeper) -> RecordReader | None:
    """The agent's records, read from its store beside the state file that keeps the offsets (the
    API source's and the publisher's are in the agent's state_dir); None for a keeper of no file."""
    path = getattr(state, "path", None)
    if not isinstance(path, Path):
        return None
    return functools.partial(agent_record, path.parent)


def _open_output(directory: Path, path: str) -> BinaryIO:
    """A collected output under the job's `outputs/`, every step opened without following a link
    (OSError for a path of another form than the record's, or anything but a regular file)."""
    try:
        check_output_path(path)
    except OutputRefused as exc:
        raise OSError(errno.EINVAL, str(exc)) from None
    top = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = open_under(top, path)
    finally:
        os.close(top)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _read_range(path: Path, start: int, size: int) -> bytes:
    try:
        with path.open("rb") as handle:
            return os.pread(handle.fileno(), size, start)
    except OSError:
        return b""
