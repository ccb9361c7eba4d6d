"""A job's life after admission: prepare, run (locally, or through Slurm with one retry after a
node failure), follow, finish; and the same job followed again after the agent restarted.

The agent and `hpc-runner run` both drive jobs through `JobDriver`; they differ only in where
the log goes (a CI service or the local queue's offset, or stdout) and where the driver's own
notes go (the job's log, or stderr). Every state change of a job after its admission goes
through here, and each job's final status is recorded (audit `final_status`) exactly once,
across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

from runner import metrics
from runner.errors import InfrastructureError
from runner.executors.local import LocalExecutor, LocalLaunch, local_launch
from runner.executors.slurm import QueueLimit, SlurmExecutor, SlurmJob, SlurmUnavailable, SubmissionFailed
from runner.executors.slurm.tracker import NodesGiven, PendingInfo, TrackerEvent
from runner.job import Ended, JobRecord, JobState, Outcome
from runner.job.prepared import PreparedJob
from runner.lifecycle.access import UnknownJob
from runner.lifecycle.admission import first_few, log_path_of, redecide, workspace_of
from runner.lifecycle.notes import Notes, append_to_log
from runner.lifecycle.prepare import Site, job_dir, prepare_job, return_workspace
from runner.lifecycle.recording import record_run, recorded_left_out, recorded_outputs, save_run_facts
from runner.lifecycle.setup import PreparedSetup, check_caches, prepare_setup, run_setup
from runner.logging_setup import get_logger
from runner.logs.tail import LogSink, pump
from runner.store import Store
from sandbox.plan import SandboxRefused
from sandbox.workspace import WorkspaceError

log = get_logger("runner.lifecycle")

# Called with the job's new record after each change of its state, and of why it waits in Slurm
# or of the nodes it was given (`JobRecord.state_reason`, `node_list`).
StateWatcher = Callable[[JobRecord], None]


class Executor(Protocol):
    async def run(self, launch: LocalLaunch, cancel: asyncio.Event | None = None) -> Outcome: ...


class JobDriver:
    def __init__(self, site: Site, store: Store, *, grace_seconds: float, notes: Notes = append_to_log,
                 local: Executor | None = None, slurm: SlurmExecutor | None = None,
                 actor: str = "agent") -> None:
        self.site = site
        self.store = store
        self.slurm = slurm  # None: jobs run on this node
        self._local: Executor = local or LocalExecutor()
        self._notes = notes
        self._grace = grace_seconds
        self._actor = actor  # who the audit log says did what the driver does
        self._watchers: dict[str, list[StateWatcher]] = {}
        self._watching_every: list[StateWatcher] = []

    # -- the record --------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        record = self.store.get_job(job_id)
        if record is None:
            raise UnknownJob(f"no job {job_id}")
        return record

    def log_path(self, record: JobRecord) -> Path:
        return log_path_of(self.site, record)

    def note(self, job_id: str, text: str) -> None:
        self._notes(self.log_path(self.get(job_id)), text)

    def ended(self, job_id: str) -> Ended:
        record = self.get(job_id)
        return Ended(record.state, record.exit_status, record.outcome_detail,
                     outputs=recorded_outputs(self.store, job_id),
                     outputs_left_out=recorded_left_out(self.store, job_id))

    def watch(self, job_id: str, watcher: StateWatcher) -> Callable[[], None]:
        """Call `watcher` after each state change of the job (and change of its whereabouts: see
        `StateWatcher`); returns what stops it."""
        self._watchers.setdefault(job_id, []).append(watcher)

        def unwatch() -> None:
            watchers = self._watchers.get(job_id, [])
            with contextlib.suppress(ValueError):
                watchers.remove(watcher)
            if not watchers:
                self._watchers.pop(job_id, None)
        return unwatch

    def watch_every(self, watcher: StateWatcher) -> None:
        """Call `watcher` after each state change of every job, and each change of its whereabouts
        (the hub publisher follows them all)."""
        self._watching_every.append(watcher)

    def set_state(self, job_id: str, state: JobState, *, actor: str | None = None,
                  exit_status: int | None = None, detail: str | None = None) -> JobRecord:
        record = self.store.set_state(job_id, state, actor=actor or self._actor, exit_status=exit_status,
                                      outcome_detail=detail)
        self._tell_watchers(record)
        return record

    def set_whereabouts(self, job_id: str, *, state_reason: str | None, node_list: str | None,
                        announce: bool = True) -> None:
        """Record why the job waits in Slurm and the nodes it was given; the watchers hear of it
        when either changed (`announce`: False when a change of state follows at once and says it)."""
        record = self.store.set_whereabouts(job_id, state_reason=state_reason, node_list=node_list)
        if record is not None and announce:
            self._tell_watchers(record)

    def _tell_watchers(self, record: JobRecord) -> None:
        for watcher in [*self._watchers.get(record.id, []), *self._watching_every]:
            try:
                watcher(record)
            except Exception:  # a watcher's trouble is its own; the job goes on
                log.exception("a job's state watcher failed", job=record.id)

    @property
    def _executor_name(self) -> str:
        return "slurm" if self.slurm is not None else "local"

    # -- running -----------------------------------------------------------------------------------

    async def drive(self, job_id: str, *, cancel: asyncio.Event, sink: LogSink, offset: int) -> Ended:
        """Run an admitted job to its end, its log from `offset` fed to `sink`; `cancel` cancels it."""
        record = self.get(job_id)
        await self._streamed(record, self._execute(record, cancel), sink=sink, offset=offset)
        return self.ended(job_id)

    async def follow(self, job_id: str, job: SlurmJob, *, cancel: asyncio.Event, sink: LogSink,
                     offset: int) -> Ended:
        """Follow again a Slurm job a previous agent submitted, to its end."""
        assert self.slurm is not None
        record = self.get(job_id)
        log.info("reattached to a Slurm job", job=job_id, slurm_id=job.slurm_id)
        await self._streamed(record, self._follow_slurm(self.slurm, job_id, job, cancel), sink=sink,
                             offset=offset)
        return self.ended(job_id)

    async def deliver_end(self, job_id: str, outcome: Outcome | None, *, sink: LogSink, offset: int) -> Ended:
        """A job that ended while no agent watched it (`outcome`, None: not found again): its end
        recorded, what ran ending its log as for a job followed to its end, then the rest of its
        log to `sink`; the source reports the end after that."""
        record = self.get(job_id)
        if outcome is not None:
            await self.end(job_id, outcome)
        await pump(self.log_path(record), offset=offset, done=lambda: True,
                   sink=_metered(sink, record.source))
        if outcome is None:
            if not record.state.is_terminal:
                self.finish(job_id, Outcome("infra_failed", None, "the agent stopped while the job ran "
                                                                  "and cannot find it again"))
            else:
                self.report_final(job_id)
        return self.ended(job_id)

    async def _streamed(self, record: JobRecord, work: Coroutine[Any, Any, None], *, sink: LogSink,
                        offset: int) -> None:
        execution = asyncio.create_task(work)
        try:
            await pump(self.log_path(record), offset=offset, done=execution.done,
                       sink=_metered(sink, record.source))
        except BaseException:
            # Stopped (the agent stops) or the sink failed: the job is left where it is, and a
            # Slurm job runs on, for the next agent to follow.
            execution.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await execution
            raise
        await execution

    async def _execute(self, record: JobRecord, cancel: asyncio.Event) -> None:
        try:
            await self._prepare_and_run(record, cancel)
        except Exception as exc:  # one job's trouble must not stop the others
            log.exception("job failed in the agent", job=record.id)
            self.fail(record.id, f"the agent could not run the job: {exc}")

    async def _prepare_and_run(self, record: JobRecord, cancel: asyncio.Event) -> None:
        spec, decision = redecide(self.site.policy, record)
        log_path = self.log_path(record)
        if not decision.allowed:
            # The policy changed (SIGHUP) between admission and start: the new one rules.
            self._notes(log_path, "hpc-runner: denied by the reloaded policy:\n"
                        + "".join(f"  - {r}\n" for r in decision.reasons))
            self.set_state(record.id, JobState.denied, detail="; ".join(decision.reasons))
            return
        try:
            _refuse_uncopied_workspace(record)
            await asyncio.to_thread(check_caches, decision)
            prepared = await asyncio.to_thread(prepare_job, self.site, job_id=record.id, spec=spec,
                                               decision=decision, workspace=workspace_of(record))
            setup = await asyncio.to_thread(prepare_setup, self.site, prepared, self._grace)
            await asyncio.to_thread(save_run_facts, self.site, prepared, executor=self._executor_name)
        except (SandboxRefused, InfrastructureError) as exc:
            refused = isinstance(exc, SandboxRefused)
            self._notes(log_path, f"hpc-runner: {'refused: ' if refused else ''}{exc}\n")
            self.set_state(record.id, JobState.denied if refused else JobState.infra_failed, detail=str(exc))
            if not refused:  # denials are answered at admission, never as final statuses
                self.report_final(record.id)
            return
        if setup is not None and not await self._set_up(record.id, setup, cancel):
            return
        if self.slurm is not None:
            await self._run_on_slurm(self.slurm, record, prepared, cancel)
            return
        # The job runs on this host: its page names it as Slurm would name a job's node.
        self.set_whereabouts(record.id, state_reason=None, node_list=socket.gethostname(), announce=False)
        self.set_state(record.id, JobState.running)
        self.store.append_audit(actor=self._actor, action="started", job_id=record.id,
                                detail={"argv": list(prepared.argv), "image": prepared.image.path,
                                        "image_sha256": prepared.image.sha256})
        try:
            outcome = await self._local.run(local_launch(prepared, self._grace), cancel)
        except InfrastructureError as exc:  # Apptainer (or mpirun) could not be started
            self._notes(log_path, f"hpc-runner: {exc}\n")
            outcome = Outcome("infra_failed", None, str(exc))
        await self.end(record.id, outcome)

    async def _set_up(self, job_id: str, setup: PreparedSetup, cancel: asyncio.Event) -> bool:
        """Run the job's setup phase on this host; False: it ended the job (nothing goes to Slurm)."""
        self.set_whereabouts(job_id, state_reason=None, node_list=socket.gethostname(), announce=False)
        self.set_state(job_id, JobState.running)
        self.store.append_audit(actor=self._actor, action="setup_started", job_id=job_id,
                                detail={"argv": list(setup.launch.argv)})
        ended = await run_setup(setup, self._local.run, cancel)
        if ended is None:
            return True
        await self.end(job_id, ended)
        return False

    # -- Slurm -------------------------------------------------------------------------------------

    async def _run_on_slurm(self, slurm: SlurmExecutor, record: JobRecord, prepared: PreparedJob,
                            cancel: asyncio.Event) -> None:
        # Recorded before sbatch, so a restart between the two looks for the job by its name.
        self.store.set_slurm_id(record.id, None, "slurm")
        # A job submitted again after a node failure starts over: no reason, no nodes yet.
        self.set_whereabouts(record.id, state_reason=None, node_list=None, announce=False)
        self.set_state(record.id, JobState.pending)
        try:
            job = await slurm.submit(prepared, comment=record.external_id or f"hpc-runner job {record.id}")
        except SubmissionFailed as exc:  # the executor wrote Slurm's words into the log
            self.finish(record.id, Outcome("failed", None, f"Slurm refused the job: {exc.slurm_message}"))
            return
        except SlurmUnavailable as exc:
            self.finish(record.id, Outcome("infra_failed", None, f"could not submit the job to Slurm: {exc}"))
            return
        assert job.slurm_id is not None
        self.store.set_slurm_id(record.id, job.slurm_id, "slurm")
        self.store.append_audit(actor=self._actor, action="submitted", job_id=record.id,
                                detail={"slurm_id": job.slurm_id, "image": prepared.image.path,
                                        "image_sha256": prepared.image.sha256})
        await self._follow_slurm(slurm, record.id, job, cancel)

    async def _follow_slurm(self, slurm: SlurmExecutor, job_id: str, job: SlurmJob,
                            cancel: asyncio.Event) -> None:
        def running() -> None:
            record = self.get(job_id)
            if record.state == JobState.pending:
                # Slurm's reason was why it waited; a running job waits for nothing.
                self.set_whereabouts(job_id, state_reason=None, node_list=record.node_list, announce=False)
                self.set_state(job_id, JobState.running)

        def heard(event: TrackerEvent) -> None:
            if isinstance(event, PendingInfo):
                record = self.get(job_id)
                if record.state == JobState.pending:
                    # "None": Slurm's scheduler has not looked at the job yet.
                    reason = event.reason if event.reason not in (None, "", "None") else None
                    self.set_whereabouts(job_id, state_reason=reason, node_list=record.node_list)
            elif isinstance(event, NodesGiven) and not self.get(job_id).state.is_terminal:
                # A job given nodes waits for nothing, also one that ran and ended between two
                # polls (never seen running).
                self.set_whereabouts(job_id, state_reason=None, node_list=event.node_list)

        outcome = await slurm.follow(job, cancel=cancel, grace_seconds=self._grace, on_running=running,
                                     on_event=heard, queue_limit=self._queue_limit(job_id))
        if outcome.retryable and not cancel.is_set() \
                and await self._resubmit_after_node_failure(slurm, job_id, outcome, cancel):
            return
        await self.end(job_id, outcome)

    def _queue_limit(self, job_id: str) -> QueueLimit | None:
        """How long the job may pend in Slurm (its queue_time, under the policy now in force),
        counted from its last submission, so that a restarted agent keeps the same deadline."""
        record = self.get(job_id)
        _, decision = redecide(self.site.policy, record)
        if decision.slurm is None or decision.slurm.queue_seconds <= 0:
            return None
        submitted = [entry.at for entry in self.store.audit_entries(job_id=job_id)
                     if entry.action == "submitted"]
        return QueueLimit(decision.slurm.queue_seconds, submitted[-1] if submitted else record.updated_at)

    async def _resubmit_after_node_failure(self, slurm: SlurmExecutor, job_id: str, outcome: Outcome,
                                           cancel: asyncio.Event) -> bool:
        """Submit a job a failed node ended once more, if its account allows; False: it ends here.

        The policy decides again (it may have been reloaded since the job was admitted), and the
        "resubmitted" audit entry, written before sbatch, keeps it to one retry across restarts.
        """
        record = self.get(job_id)
        if record.state.is_terminal:
            return False
        log_path = self.log_path(record)
        if any(entry.action == "resubmitted" for entry in self.store.audit_entries(job_id=job_id)):
            self._notes(log_path, f"hpc-runner: {outcome.detail}; it was already submitted again "
                                  "once, so it ends here\n")
            return False
        spec, decision = redecide(self.site.policy, record)
        if not decision.allowed or not decision.retry_node_failure:
            why = "the policy no longer allows the job" if not decision.allowed else \
                f"account {decision.account} does not retry node failures (retry_node_failures)"
            self._notes(log_path, f"hpc-runner: {outcome.detail}; not submitted again: {why}\n")
            return False
        self.store.append_audit(actor=self._actor, action="resubmitted", job_id=job_id,
                                detail={"reason": outcome.detail, "previous_slurm_id": record.slurm_id})
        self._notes(log_path, f"hpc-runner: {outcome.detail}; submitting it again, once, as account "
                              f"{decision.account} allows (retry_node_failures)\n")
        log.warning("a node failed under a job; submitting it again", job=job_id, slurm_id=record.slurm_id)
        try:
            _refuse_uncopied_workspace(record)
            # The setup phase is not run again (runner.lifecycle.setup); the caches are still checked.
            await asyncio.to_thread(check_caches, decision)
            prepared = await asyncio.to_thread(prepare_job, self.site, job_id=job_id, spec=spec,
                                               decision=decision, workspace=workspace_of(record))
            await asyncio.to_thread(save_run_facts, self.site, prepared, executor=self._executor_name)
        except (SandboxRefused, InfrastructureError) as exc:
            self._notes(log_path, f"hpc-runner: cannot submit the job again: {exc}\n")
            return False
        await self._run_on_slurm(slurm, record, prepared, cancel)
        return True

    # -- the end -----------------------------------------------------------------------------------

    async def end(self, job_id: str, outcome: Outcome) -> None:
        """A job that ran has ended: its outputs are collected and its provenance recorded (the
        log's last lines say what ran), and its results go back to the submitted directory, all
        before its final state is recorded, so whoever sees the state finds them in place."""
        record = self.get(job_id)
        if not record.state.is_terminal:
            try:
                await record_run(self.site, self.store, record, outcome, notes=self._notes, actor=self._actor)
            except Exception as exc:  # the job's end matters more than its record
                log.exception("provenance not recorded", job=job_id)
                with contextlib.suppress(OSError):
                    self._notes(self.log_path(record), f"hpc-runner: no provenance record: {exc}\n")
            await self._return_workspace(self.get(job_id))
        self.finish(job_id, outcome)

    def finish(self, job_id: str, outcome: Outcome) -> None:
        """Record a job's end and report its final status exactly once, across restarts."""
        if not self.get(job_id).state.is_terminal:
            self.set_state(job_id, JobState(outcome.state), exit_status=outcome.exit_status,
                           detail=outcome.detail)
        self.report_final(job_id)

    def fail(self, job_id: str, detail: str, *, noted: bool = False) -> Ended:
        """End a job that could not be run as infra_failed, unless it already ended; `noted`: its
        log already says why."""
        record = self.get(job_id)
        if not record.state.is_terminal:
            if not noted:
                with contextlib.suppress(OSError):  # the state matters more than the note
                    self._notes(self.log_path(record), f"hpc-runner: {detail}\n")
            self.set_state(job_id, JobState.infra_failed, detail=detail)
        self.report_final(job_id)
        return self.ended(job_id)

    def cancel_queued(self, job_id: str, *, actor: str, detail: str, note: str | None = None) -> JobRecord:
        """End a job that has not started as cancelled."""
        if note is not None:
            self._notes(self.log_path(self.get(job_id)), note)
        record = self.set_state(job_id, JobState.cancelled, actor=actor, detail=detail)
        self.report_final(job_id)
        return record

    def report_final(self, job_id: str) -> None:
        if self.store.mark_final_reported(job_id):
            record = self.get(job_id)
            self.store.append_audit(actor=self._actor, action="final_status", job_id=job_id,
                                    detail={"state": str(record.state), "exit_status": record.exit_status,
                                            "detail": record.outcome_detail})
            log.info("job finished", job=job_id, state=str(record.state), exit_status=record.exit_status)

    async def _return_workspace(self, record: JobRecord) -> None:
        try:
            returned = await asyncio.to_thread(return_workspace, self.site.config, record.id)
        except (WorkspaceError, OSError) as exc:
            log.warning("results not copied back", job=record.id, error=str(exc))
            self._notes(self.log_path(record), f"hpc-runner: results not copied back: {exc}; they stay in "
                                               f"{job_dir(self.site.config, record.id) / 'workspace'}\n")
            return
        if returned is None:
            return
        log.info("results copied back", job=record.id, files=returned.files, bytes=returned.bytes,
                 not_returned=len(returned.not_returned))
        if returned.not_returned:
            self._notes(self.log_path(record), "hpc-runner: not copied back to "
                        f"{(record.decision or {}).get('submitted_workspace')}: "
                        f"{first_few(returned.not_returned)}\n")


def _metered(sink: LogSink, source: str) -> LogSink:
    """`sink`, with the bytes it took counted as forwarded for `source`."""
    async def counted(offset: int, data: bytes) -> None:
        await sink(offset, data)
        metrics.log_bytes_forwarded(source, len(data))
    return counted


def _refuse_uncopied_workspace(record: JobRecord) -> None:
    """A job queued by an agent that bound submitted directories by their path (before they were
    copied) is not started: its directory may have been swapped while it waited."""
    if "workspace_owner" in (record.decision or {}):
        raise SandboxRefused("this job was queued with its submitted directory as its workspace, which "
                             "is no longer done (it could be swapped while the job waits); submit it again")
