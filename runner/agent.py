"""The long-running agent's jobs: the local queue's workers, the door CI sources come in by
(`runner.sources.JobHost`), access control, drain and policy reload.

A job's life itself (admission, preparation, running, following, its end, recovery after a
restart) is `runner.lifecycle`'s; the agent decides when each job gets its turn. All store access
happens on the event loop's thread. See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner import retention
from runner.config import AgentConfig
from runner.errors import HpcRunnerError, InputError
from runner.executors.slurm import SlurmExecutor, SlurmJob, SlurmSite
from runner.identity import Identity
from runner.job import ACTIVE_STATES, Ended, JobRecord, JobState, Outcome
from runner.lifecycle.access import NotAllowed, UnknownJob, may_control, refuse_unless_allowed
from runner.lifecycle.admission import Admission, Admissions, Admitted, SubmittedWorkspace, redecide
from runner.lifecycle.driver import Executor, JobDriver, StateWatcher
from runner.lifecycle.metering import JobMetering
from runner.lifecycle.notes import append_to_log
from runner.lifecycle.prepare import Site
from runner.lifecycle.recording import REPLAY_ACTION
from runner.lifecycle.recovery import find_slurm_jobs, recover_records
from runner.logging_setup import get_logger
from runner.logs.tail import LogSink
from runner.metrics import reattached
from runner.policy import Decision, Policy, Usage, waits_for_a_place
from runner.provenance.commit import head_commit
from runner.provenance.facts import file_sha256
from runner.spec import JobSpec, spec_from_json
from runner.store import Store
from runner.tasks import TaskSet, pause

__all__ = ["Agent", "NoRecord", "NotAllowed", "ReplayRefused", "UnknownJob", "slurm_executor"]

log = get_logger("runner.agent")

# Who cancelled a job, in the audit log and the job's log, when the cancel was asked at the hub.
HUB_ACTOR = "the hub"


class NoRecord(HpcRunnerError):
    """The job has no provenance record (yet): the message says why."""


class ReplayRefused(HpcRunnerError):
    """A replay would not run what the original ran: the message says what differs and how to fix it."""


@dataclass
class _Turn:
    """A job waiting for, or holding, one of the agent's `max_jobs` slots."""

    cancel: asyncio.Event
    task: asyncio.Task[None] | asyncio.Task[Ended]
    started: bool = False  # holds its slot: a cancel reaches it through `cancel` only
    unwatch: list[Callable[[], None]] = field(default_factory=list)
    # Waiting for a place under its account's max_concurrent_jobs: its account (as admitted) and
    # when it was submitted, its place in the account's line.
    waiting_in: str | None = None
    submitted_at: float = 0.0
    # Given a place under its account's cap, not yet in Slurm or running: it counts as running.
    placed: bool = False


class Agent:
    def __init__(self, config: AgentConfig, policy: Policy, store: Store, *,
                 policy_loader: Callable[[], Policy] | None = None,
                 grace_seconds: float = 10.0, executor: Executor | None = None,
                 slurm: SlurmExecutor | None = None) -> None:
        self.config = config
        self.site = Site(config, policy)
        self.store = store
        # With executor = "slurm" every job goes through Slurm; the local executor is unused.
        if slurm is None and config.executor == "slurm":
            slurm = slurm_executor(config)
        self.driver = JobDriver(self.site, store, grace_seconds=grace_seconds, local=executor, slurm=slurm)
        self.admissions = Admissions(self.site, store, append_to_log, accepting=lambda: self._accepting)
        JobMetering(store).attach(self.admissions, self.driver)
        self._background = TaskSet()
        self._policy_loader = policy_loader
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._turns: dict[str, _Turn] = {}
        # Slurm jobs of a previous agent that were cancelled before they were followed again.
        self._cancel_on_reattach: set[str] = set()
        self._slots = asyncio.Semaphore(config.max_jobs)
        self._accepting = True
        self._workers: list[asyncio.Task[None]] = []
        self._uid = os.geteuid()
        self.finished = asyncio.Event()
        # CI sources watch these: the first SIGTERM drains, the second stops.
        self._draining = asyncio.Event()
        self._stopping = asyncio.Event()
        # What the reattachment found of CI source jobs, for their sources to `resume`.
        self._found_running: dict[str, SlurmJob] = {}
        self._found_finished: dict[str, Outcome] = {}
        self._reattached = asyncio.Event()
        # Set, and replaced, whenever a job changes state or the policy is reloaded: what jobs
        # waiting for a place under their account's max_concurrent_jobs look again at.
        self._places_changed = asyncio.Event()
        self.driver.watch_every(lambda _record: self._look_again())
        # What `[retention]` measures a finished job's age by, and how often it looks.
        self.clock: Callable[[], float] = time.time
        self.retention_interval = retention.INTERVAL_SECONDS

    @property
    def policy(self) -> Policy:
        return self.site.policy

    # -- the local queue ---------------------------------------------------------------------------

    async def submit(self, identity: Identity, spec: JobSpec, submitted: Path, *,
                     submitter_uid: int | None) -> tuple[JobRecord, Decision]:
        """Decide and record a job of the local queue; an allowed one is queued with its own copy
        of the submitted directory as its workspace. Raises NotAllowed when draining, InputError
        when the directory cannot be copied (nothing is recorded then)."""
        admitted = await self.admissions.admit(Admission(
            "local", None, identity, spec, submitted=SubmittedWorkspace(submitted, submitter_uid)))
        if admitted.decision.allowed:
            self._queue.put_nowait(admitted.job_id)
        return self.driver.get(admitted.job_id), admitted.decision

    def provenance(self, identity: Identity, job_id: str) -> tuple[JobRecord, bytes]:
        """A job the caller may see, with its provenance record's stored bytes; NoRecord says why
        there is none."""
        record = self.job_for(identity, job_id)
        data = self.store.provenance(job_id)
        if data is None:
            raise NoRecord(why_no_record(record, self.store.started_times([job_id]).get(job_id)))
        return record, data

    async def replay(self, identity: Identity, job_id: str, submitted: Path, *,
                     submitter_uid: int | None) -> tuple[JobRecord, Decision]:
        """Queue the original's spec again as `identity`'s job, under the current policy, from the
        directory `submitted` (copied as `submit` copies it). Refused unless the caller may see the
        original, it has a record, the policy's image for it is the very file the record names,
        and, when the record names a commit, `submitted` is a checkout of that commit. The new job
        is linked to the original in the audit log before it can start, so its record says so."""
        original, data = self.provenance(identity, job_id)
        statement = json.loads(data)
        spec = spec_from_json(original.spec, f"job {job_id}")
        await self._check_replayed_image(job_id, spec, statement)
        trigger = _recorded_trigger(statement)
        commit = trigger.get("commit")
        if isinstance(commit, str) and commit:
            repository = trigger.get("repository")
            await asyncio.to_thread(_check_replayed_commit, job_id, commit, submitted, submitter_uid,
                                    repository=repository if isinstance(repository, str) else None)
        admitted = await self.admissions.admit(Admission(
            "local", None, identity, spec, submitted=SubmittedWorkspace(submitted, submitter_uid)))
        # No await from here until it is queued: no worker can take the job before the link exists.
        link = {"job_id": job_id, "provenance_sha256": hashlib.sha256(data).hexdigest()}
        self.store.append_audit(actor=identity.actor_principal, action=REPLAY_ACTION,
                                job_id=admitted.job_id, detail=link)
        if admitted.decision.allowed:
            self._queue.put_nowait(admitted.job_id)
        return self.driver.get(admitted.job_id), admitted.decision

    async def _check_replayed_image(self, job_id: str, spec: JobSpec, statement: dict[str, Any]) -> None:
        recorded_path, recorded = _recorded_image(statement)
        image = self.policy.images.get(spec.image)
        if image is None:
            raise ReplayRefused(f"job {job_id} ran image {spec.image!r} ({recorded_path or 'path unknown'}), "
                                "which the policy's catalogue no longer has")
        if recorded is None:
            raise ReplayRefused(f"the record of job {job_id} names no digest of its image {spec.image!r}, "
                                "so nothing shows that the image is still the one it ran")
        now = await asyncio.to_thread(file_sha256, image.path, self.site.digest_cache())
        if now != recorded:
            found = f"its sha256 is now {now}" if now is not None else "it cannot be read as a file"
            raise ReplayRefused(f"image {spec.image!r} at {image.path} is not the one job {job_id} ran: "
                                f"{found}, the record says {recorded}"
                                + (f" (it ran {recorded_path})" if recorded_path not in (None, image.path)
                                   else ""))

    async def _worker(self) -> None:
        """Give each local job its turn, in the order queued: a job that waits (for a slot, or for
        a place under its account's cap) keeps no other job from its own turn."""
        while True:
            job_id = await self._queue.get()
            record = self.store.get_job(job_id)
            if record is None or record.state != JobState.queued:
                continue
            self._background.spawn(self._local_turn(job_id, record.log_offset))

    async def _local_turn(self, job_id: str, offset: int) -> None:
        try:
            await self._take_turn(job_id, cancel=asyncio.Event(), sink=self._offset_sink(job_id),
                                  offset=offset)
        except Exception:  # one job's trouble must not stop the others
            log.exception("job failed in the agent", job=job_id)

    def _offset_sink(self, job_id: str) -> LogSink:
        """The local queue's log sink: the log file is the delivery; the offset is what was read."""
        async def sink(offset: int, data: bytes) -> None:
            if not data:  # the file restarted from 0 (truncated or rotated)
                self.store.set_log_offset(job_id, 0, reset=True)
            else:
                self.store.set_log_offset(job_id, offset + len(data))
        return sink

    # -- the door of the CI sources (runner.sources.JobHost) ---------------------------------------

    @property
    def draining(self) -> asyncio.Event:
        return self._draining

    @property
    def stopping(self) -> asyncio.Event:
        return self._stopping

    async def admit(self, admission: Admission) -> Admitted:
        return await self.admissions.admit(admission)

    def job(self, job_id: str) -> JobRecord | None:
        return self.store.get_job(job_id)

    def note(self, job_id: str, text: str) -> None:
        self.driver.note(job_id, text)

    def fail(self, job_id: str, detail: str) -> Ended:
        return self.driver.fail(job_id, detail, noted=True)

    async def run(self, job_id: str, *, sink: LogSink, cancel: asyncio.Event, offset: int = 0,
                  on_change: StateWatcher | None = None) -> Ended:
        """Run an admitted CI job to its end, its log from `offset` fed to `sink`; `cancel` cancels it."""
        if self.driver.get(job_id).state.is_terminal:
            return self.driver.ended(job_id)
        return await self._take_turn(job_id, cancel=cancel, sink=sink, offset=offset, on_change=on_change)

    async def resume(self, job_id: str, *, sink: LogSink, cancel: asyncio.Event, offset: int = 0,
                     on_change: StateWatcher | None = None) -> Ended:
        """Carry on with a CI job a previous agent had: follow it again, or deliver the rest of its log."""
        if self.driver.get(job_id).state == JobState.queued:
            return await self.run(job_id, sink=sink, cancel=cancel, offset=offset, on_change=on_change)
        await self._reattached.wait()
        turn = self._enter(job_id, cancel, on_change)
        turn.started = True
        try:
            running = self._found_running.pop(job_id, None)
            if running is not None and self.driver.slurm is not None:
                return await self.driver.follow(job_id, running, cancel=cancel, sink=sink, offset=offset)
            return await self.driver.deliver_end(job_id, self._found_finished.pop(job_id, None), sink=sink,
                                                 offset=offset)
        finally:
            self._leave(job_id)

    # -- turns -------------------------------------------------------------------------------------

    async def _take_turn(self, job_id: str, *, cancel: asyncio.Event, sink: LogSink, offset: int,
                         on_change: StateWatcher | None = None) -> Ended:
        """Wait for a place under the account's cap and for a slot, then drive the job (unless it
        ended meanwhile: a cancel while queued)."""
        self._enter(job_id, cancel, on_change)
        try:
            await self._wait_for_a_place(job_id, cancel)
            async with self._slots:
                record = self.driver.get(job_id)
                if record.state != JobState.queued:
                    return self.driver.ended(job_id)
                self._turns[job_id].started = True
                if cancel.is_set():
                    self.driver.cancel_queued(job_id, actor="agent", detail="cancelled before it started",
                                              note="hpc-runner: cancelled before it started\n")
                    return self.driver.ended(job_id)
                return await self.driver.drive(job_id, cancel=cancel, sink=sink, offset=offset)
        finally:
            self._leave(job_id)

    # -- places under the accounts' max_concurrent_jobs -------------------------------------------

    def _look_again(self) -> None:
        self._places_changed.set()
        self._places_changed = asyncio.Event()

    async def _wait_for_a_place(self, job_id: str, cancel: asyncio.Event) -> None:
        """Return once the job may start under its account's max_concurrent_jobs (decided again
        under the policy in force: it may have been reloaded), it ended, or `cancel` is set. Jobs of
        one account get their places in the order they were submitted; why the job waits goes
        into its log and is its state_reason (the dashboards, the hub and the CI show it)."""
        turn = self._turns[job_id]
        record = self.driver.get(job_id)
        turn.waiting_in = (record.decision or {}).get("account")
        turn.submitted_at = record.created_at
        said: str | None = None
        try:
            while not cancel.is_set():
                record = self.driver.get(job_id)
                if record.state != JobState.queued:
                    return
                why = self._why_wait(job_id, record)
                if why is None:
                    turn.placed = True
                    if said is not None:
                        self.driver.note(job_id, "hpc-runner: a place is free; the job starts\n")
                        self.driver.set_whereabouts(job_id, state_reason=None, node_list=None)
                    return
                if why != said:
                    self.driver.note(job_id, f"hpc-runner: waiting in the agent's queue: {why} "
                                             "(max_concurrent_jobs); it starts when one of them ends\n")
                    self.driver.set_whereabouts(job_id, state_reason=why, node_list=None)
                    said = why
                waits = [asyncio.ensure_future(self._places_changed.wait()),
                         asyncio.ensure_future(cancel.wait())]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiting in waits:
                        waiting.cancel()
        finally:
            turn.waiting_in = None

    def _why_wait(self, job_id: str, record: JobRecord) -> str | None:
        """Why the job cannot start yet under its account's max_concurrent_jobs, or None."""
        _, decision = redecide(self.policy, record)
        account = self.policy.accounts.get(decision.account or "")
        if not decision.allowed or account is None or account.max_concurrent_jobs is None:
            return None  # no cap to wait for (a job the policy now denies is denied as it starts)
        turn = self._turns[job_id]
        running = self.store.count_by_account(ACTIVE_STATES).get(account.name, 0)
        for other_id, other in self._turns.items():
            if other_id == job_id:
                continue
            other_record = self.store.get_job(other_id)
            if other_record is None or other_record.state != JobState.queued:
                continue
            if other.placed and (other_record.decision or {}).get("account") == account.name:
                running += 1  # given its place, about to be submitted
            elif other.waiting_in == account.name \
                    and (other.submitted_at, other_id) < (turn.submitted_at, job_id):
                running += 1  # waits before this one
        return waits_for_a_place(account, Usage(running_by_account={account.name: running}))

    def _enter(self, job_id: str, cancel: asyncio.Event, on_change: StateWatcher | None) -> _Turn:
        task = asyncio.current_task()
        assert task is not None
        turn = _Turn(cancel, task)
        if on_change is not None:
            turn.unwatch.append(self.driver.watch(job_id, on_change))
        self._turns[job_id] = turn
        return turn

    def _leave(self, job_id: str) -> None:
        turn = self._turns.pop(job_id, None)
        for unwatch in turn.unwatch if turn is not None else []:
            unwatch()
        self._maybe_finished()

    # -- control -----------------------------------------------------------------------------------

    def may_control(self, identity: Identity, record: JobRecord) -> bool:
        return may_control(self.policy, identity, record, agent_uid=self._uid)

    def job_for(self, identity: Identity, job_id: str) -> JobRecord:
        record = self.driver.get(job_id)
        refuse_unless_allowed(self.policy, identity, record, agent_uid=self._uid)
        return record

    def visible_jobs(self, identity: Identity) -> list[JobRecord]:
        return [r for r in self.store.list_jobs() if self.may_control(identity, r)]

    def cancel(self, identity: Identity, job_id: str) -> JobRecord:
        return self._cancel(self.job_for(identity, job_id), identity.actor_principal)

    def cancel_from_hub(self, job_id: str) -> None:
        """A cancel asked for at the hub of a job this agent published there (`HubPublisher`). The
        hub judged who may ask, by the job's identity and its account's admins; the agent trusts it
        with that much, as it trusts it to hand out the API jobs' cancels."""
        record = self.job(job_id)
        if record is not None:
            self._cancel(record, HUB_ACTOR)

    def _cancel(self, record: JobRecord, actor: str) -> JobRecord:
        job_id = record.id
        if record.state.is_terminal:
            return record
        self.store.append_audit(actor=actor, action="cancel", job_id=job_id, detail={})
        turn = self._turns.get(job_id)
        if turn is not None and turn.started:
            turn.cancel.set()
            return record
        if self.driver.slurm is not None and record.executor == "slurm" \
                and record.state in (JobState.pending, JobState.running):
            # Submitted before the agent restarted and not followed again yet: marking it
            # cancelled here would leave it running in Slurm. Its follower cancels it there.
            self._cancel_on_reattach.add(job_id)
            return record
        return self.driver.cancel_queued(
            job_id, actor=actor, detail=f"cancelled by {actor} while queued",
            note=f"hpc-runner: cancelled by {actor} before it started\n")

    # -- start, reattach, reload, drain ------------------------------------------------------------

    def start(self) -> None:
        for record in recover_records(self.driver):
            if record.source == "local":  # a CI source resumes its own
                self._queue.put_nowait(record.id)
        if self.driver.slurm is not None:
            self._in_background(self._reattach(self.driver.slurm))
        else:
            self._reattached.set()
        self._workers = [asyncio.create_task(self._worker()) for _ in range(self.config.max_jobs)]
        self._background.spawn(self._expire_files())

    async def _expire_files(self) -> None:
        """Remove the job files `[retention]` says have expired: at start, then every interval
        until the agent drains. The removing runs off the event loop: a workspace can be large."""
        while not self._draining.is_set():
            try:
                expired = retention.expired_now(self.config, self.store, self.clock())
                removed, failed = await asyncio.to_thread(retention.remove_all, expired)
                retention.audit_removals(self.store, removed, actor="agent")
                gone = [item for item in removed if item.gone]
                if gone:
                    log.info("removed expired job files", paths=len(gone),
                             bytes=sum(item.size for item in gone))
                for reason in failed:
                    log.warning("cannot remove expired job files", reason=reason)
            except Exception:  # the next round tries again; the jobs go on meanwhile
                log.exception("removing expired job files failed")
            await pause(self.retention_interval, self._draining)


    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        self._background.spawn(work).add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # Jobs it did not reach stay pending or running until the next start finds them.
            log.error("reattaching to Slurm jobs failed; restart the agent to try again",
                      error=repr(task.exception()))

    async def _reattach(self, slurm: SlurmExecutor) -> None:
        """Find the jobs a previous agent had in Slurm: follow the live ones, finish the rest.
        Jobs of CI sources are only looked up: their sources `resume` them with their log sinks."""
        try:
            found = await find_slurm_jobs(self.driver, slurm)
            reattached("running", len(found.reconciliation.running))
            reattached("finished", len(found.reconciliation.finished))
            for job_id, job in found.reconciliation.running.items():
                if found.records[job_id].source != "local":
                    self._found_running[job_id] = job
                else:
                    self._follow_again(job_id, job)
            for job_id, outcome in found.reconciliation.finished.items():
                self._cancel_on_reattach.discard(job_id)
                if found.records[job_id].source != "local":
                    self._found_finished[job_id] = outcome
                    continue
                try:
                    # What the job wrote after the last agent stopped reading still has to be delivered.
                    await self.driver.deliver_end(job_id, outcome, sink=self._offset_sink(job_id),
                                                  offset=found.records[job_id].log_offset)
                except Exception:  # one job's trouble must not keep the others from their final status
                    log.exception("cannot record the end of a Slurm job that ended while the agent was down",
                                  job=job_id)
        finally:
            self._reattached.set()

    def _follow_again(self, job_id: str, job: SlurmJob) -> None:
        cancel = asyncio.Event()
        if job_id in self._cancel_on_reattach:
            self._cancel_on_reattach.discard(job_id)
            cancel.set()

        async def follow_it() -> None:
            try:
                await self.driver.follow(job_id, job, cancel=cancel, sink=self._offset_sink(job_id),
                                         offset=self.driver.get(job_id).log_offset)
            except Exception as exc:
                log.exception("lost track of a reattached job", job=job_id)
                self.driver.fail(job_id, f"the agent lost track of the Slurm job: {exc}")
            finally:
                self._leave(job_id)

        task = asyncio.create_task(follow_it())
        self._turns[job_id] = _Turn(cancel, task, started=True)

    def reload_policy(self) -> bool:
        if self._policy_loader is None:
            return False
        try:
            policy = self._policy_loader()
        except InputError as exc:
            log.error("policy reload refused; keeping the current policy", error=str(exc))
            self.store.append_audit(actor="agent", action="policy_reload", detail={"ok": False,
                                                                                  "error": str(exc)})
            return False
        self.site.policy = policy
        self._look_again()  # the caps may have changed for the jobs waiting for a place
        self.store.append_audit(actor="agent", action="policy_reload", detail={"ok": True})
        log.info("policy reloaded", grants=len(policy.grants))
        return True

    def drain(self) -> None:
        """First SIGTERM: take no new jobs, let running ones finish. Second: cancel them."""
        if self._accepting:
            self._accepting = False
            self._draining.set()
            for record in self.store.list_jobs(states=[JobState.queued], source="local"):
                turn = self._turns.get(record.id)
                if turn is None or not turn.started:  # still waiting for its turn
                    self.driver.cancel_queued(record.id, actor="agent",
                                              detail="the agent shut down before the job started")
            log.info("draining: no new jobs; running jobs finish", running=len(self._turns))
        else:
            log.info("second SIGTERM: cancelling running jobs", running=len(self._turns))
            self._stopping.set()
            for turn in self._turns.values():
                turn.cancel.set()
        self._maybe_finished()

    def _maybe_finished(self) -> None:
        if not self._accepting and not self._turns:
            self.finished.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.drain)
        loop.add_signal_handler(signal.SIGINT, self.drain)
        loop.add_signal_handler(signal.SIGHUP, self.reload_policy)

    async def stop_workers(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self._background.cancel_all()
        if self.driver.slurm is not None:
            await self.driver.slurm.close()


def why_no_record(record: JobRecord, started_at: float | None) -> str:
    """Why a job has no provenance record: one is written when a job that ran ends."""
    state = str(record.state)
    if record.state == JobState.queued:
        return (f"job {record.id} has no record yet: it is queued and has not run; its record is written "
                "when it ends")
    if not record.state.is_terminal:
        return f"job {record.id} has no record yet: it is still {state}; its record is written when it ends"
    if started_at is None and record.node_list is None:
        detail = f": {record.outcome_detail}" if record.outcome_detail else ""
        return f"job {record.id} never ran (it ended {state}{detail}), so it has no record"
    return (f"job {record.id} ended {state} without a record: the agent could not write it "
            f"(its log says why: hpc-runner logs {record.id})")


def _recorded_image(statement: dict[str, Any]) -> tuple[str | None, str | None]:
    """The path and sha256 of the image a record names (`resolvedDependencies`, name "image")."""
    definition = (statement.get("predicate") or {}).get("buildDefinition") or {}
    dependencies = definition.get("resolvedDependencies")
    for dependency in dependencies if isinstance(dependencies, list) else []:
        if isinstance(dependency, dict) and dependency.get("name") == "image":
            uri = dependency.get("uri")
            path = uri[len("file://"):] if isinstance(uri, str) and uri.startswith("file://") else None
            digest = (dependency.get("digest") or {}).get("sha256")
            return path, digest if isinstance(digest, str) and digest else None
    return None, None


def _recorded_trigger(statement: dict[str, Any]) -> dict[str, Any]:
    external = ((statement.get("predicate") or {}).get("buildDefinition") or {}).get("externalParameters")
    trigger = (external or {}).get("trigger") if isinstance(external, dict) else None
    return trigger if isinstance(trigger, dict) else {}


def _check_replayed_commit(job_id: str, commit: str, submitted: Path, submitter_uid: int | None, *,
                           repository: str | None) -> None:
    """Refuse unless `submitted` is a checkout of `commit`. A directory that is not the submitter's
    is refused before its HEAD is read: the refusal would otherwise tell what someone else's
    checkout is at."""
    if submitter_uid is not None:
        try:
            owner = os.lstat(submitted).st_uid
        except OSError as exc:
            raise ReplayRefused(f"{submitted}: {exc.strerror}") from None
        if owner != submitter_uid:
            raise ReplayRefused(f"{submitted} is not yours: a job's workspace must belong to its submitter")
    head = head_commit(submitted)
    found = f"is at commit {head}" if head is not None else "is no git checkout"
    if head != commit:
        of = f" of {repository}" if repository else ""
        raise ReplayRefused(f"job {job_id} ran commit {commit}{of}, and {submitted} {found}: clone the "
                            f"repository and check out that commit (git clone REPOSITORY DIR && git -C DIR "
                            f"checkout {commit}), then replay from there (--workdir DIR)")


def slurm_executor(config: AgentConfig) -> SlurmExecutor:
    return SlurmExecutor(site=SlurmSite(srun=config.slurm.srun, mpi_plugin=config.slurm.mpi_plugin),
                         poll_interval=config.slurm.poll_interval)
