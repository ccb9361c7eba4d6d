"""The long-running agent: admits jobs under the policy and runs them, one place for all sources.

Sources (the local queue today) hand it a verified identity, a job spec and a workspace;
the agent decides, records, prepares and executes, and answers status, log and cancel
requests. All store access happens on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from runner.config import AgentConfig
from runner.errors import HpcRunnerError, InfrastructureError, InputError
from runner.executors.local import LocalExecutor, LocalLaunch, local_launch
from runner.executors.slurm import SlurmExecutor, SlurmJob, SlurmSite, SlurmUnavailable, SubmissionFailed
from runner.identity import Identity
from runner.job import JobState, Outcome, new_job_id
from runner.job.prepared import PreparedJob
from runner.logging_setup import get_logger
from runner.pipeline import Site, job_dir, prepare_job, return_workspace, take_workspace
from runner.policy import Decision, Policy, Usage, decide
from runner.slurmflow import follow_slurm_job, pump_log
from runner.sources import Admission, Admitted, Ended, LogSink
from runner.spec import JobSpec, spec_from_json
from runner.store import JobRecord, Store
from sandbox.plan import SandboxRefused
from sandbox.workspace import WorkspaceError

log = get_logger("runner.agent")


class NotAllowed(HpcRunnerError):
    """The caller may not do this (for example cancel another user's job)."""


class UnknownJob(HpcRunnerError):
    pass


class Executor(Protocol):
    async def run(self, launch: LocalLaunch, cancel: asyncio.Event | None = None) -> Outcome: ...


# States a job holds a place in its account's max_concurrent_jobs in: the local queue is the
# account's queue, so waiting for a free slot counts as much as running.
_COUNTED_STATES = (JobState.queued, JobState.pending, JobState.running)


@dataclass
class _Running:
    cancel: asyncio.Event
    task: asyncio.Task[None]


class Agent:
    def __init__(self, config: AgentConfig, policy: Policy, store: Store, *,
                 policy_loader: Callable[[], Policy] | None = None,
                 grace_seconds: float = 10.0, executor: Executor | None = None,
                 slurm: SlurmExecutor | None = None) -> None:
        self.config = config
        self.site = Site(config, policy)
        self.store = store
        self._executor: Executor = executor or LocalExecutor()
        # With executor = "slurm" every job goes through Slurm; the local executor is unused.
        self._slurm = slurm or (slurm_executor(config) if config.executor == "slurm" else None)
        self._background: set[asyncio.Task[None]] = set()
        self._policy_loader = policy_loader
        self._grace = grace_seconds
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._running: dict[str, _Running] = {}
        # Slurm jobs of a previous agent that were cancelled before `_reattach` followed them again.
        self._cancel_on_reattach: set[str] = set()
        self._slots = asyncio.Semaphore(config.max_jobs)
        self._accepting = True
        self._workers: list[asyncio.Task[None]] = []
        self._uid = os.geteuid()
        self.finished = asyncio.Event()
        # CI sources (runner.sources) watch these: the first SIGTERM drains, the second stops.
        self._draining = asyncio.Event()
        self._stopping = asyncio.Event()
        # Log sinks of CI source jobs: their output goes to the CI service, not only to the file.
        self._sinks: dict[str, Callable[[int, bytes], Any]] = {}
        # What `_reattach` found of CI source jobs, for their sources to `resume`.
        self._found_running: dict[str, SlurmJob] = {}
        self._found_finished: dict[str, Outcome] = {}
        self._reattached = asyncio.Event()

    @property
    def policy(self) -> Policy:
        return self.site.policy

    # -- admission -----------------------------------------------------------------------------

    async def submit(self, identity: Identity, spec: JobSpec, submitted: Path, *,
                     submitter_uid: int | None) -> tuple[JobRecord, Decision]:
        """Decide and record a job of the local queue; an allowed one is queued with its own copy
        of the submitted directory as its workspace. Raises NotAllowed when draining, InputError
        when the directory cannot be copied (nothing is recorded then).

        The job never binds `submitted` itself: its submitter could swap it for a link to anything
        the agent's account can read while the job waits (pipeline.take_workspace). `submitter_uid`
        is the uid the directory must belong to (None: the agent's own account or root, any).
        """
        if not self._accepting:
            raise NotAllowed("the agent is shutting down and takes no new jobs")
        decision = decide(self.policy, identity, spec, Usage(running_by_account=self._active_by_account()))
        job_id = new_job_id()
        log_path = job_dir(self.config, job_id) / "output.log"
        payload = decision.to_json() | {"submitted_workspace": str(submitted)}
        if decision.allowed:
            try:
                taken = await asyncio.to_thread(take_workspace, self.config, job_id, submitted,
                                                owner=submitter_uid, agent_uid=self._uid)
            except (WorkspaceError, OSError) as exc:
                raise InputError(str(exc) if isinstance(exc, WorkspaceError)
                                 else f"workspace {submitted}: {exc.strerror}") from None
            payload |= {"workspace": str(taken.path), "workspace_origin": taken.snapshot.origin.to_json()}
            if taken.snapshot.left_out:  # the log is the job's own output: the agent speaks only of trouble
                self._write_log(log_path, "hpc-runner: not copied into the job's workspace (not a file, "
                                          f"directory or link): {_first_few(taken.snapshot.left_out)}\n")
            log.info("workspace copied", job=job_id, submitted=str(submitted),
                     entries=len(taken.snapshot.entries), bytes=taken.snapshot.bytes)
        if not self._accepting:  # drained while the copy was made
            shutil.rmtree(job_dir(self.config, job_id), ignore_errors=True)
            raise NotAllowed("the agent is shutting down and takes no new jobs")
        record = self.store.add_job(source="local", identity=identity.to_json(), spec=spec.to_json(),
                                    job_id=job_id, log_path=log_path)
        self.store.record_decision(job_id, actor=identity.actor_principal, decision=payload)
        if decision.allowed:
            self._queue.put_nowait(job_id)
        else:
            self._write_log(log_path, "hpc-runner: denied by policy:\n"
                            + "".join(f"  - {reason}\n" for reason in decision.reasons))
        log.info("job admitted" if decision.allowed else "job denied", job=job_id,
                 actor=identity.actor_principal, grant=decision.grant, reasons=list(decision.reasons))
        return self.store.get_job(job_id) or record, decision

    def _active_by_account(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.store.list_jobs(states=_COUNTED_STATES):
            account = (record.decision or {}).get("account")
            if isinstance(account, str):
                counts[account] = counts.get(account, 0) + 1
        return counts

    def _write_log(self, path: Path, text: str) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write(text)

    # -- CI sources (runner.sources.JobHost) ---------------------------------------------------

    @property
    def draining(self) -> asyncio.Event:
        return self._draining

    @property
    def stopping(self) -> asyncio.Event:
        return self._stopping

    def admit(self, admission: Admission) -> Admitted:
        """Decide and record a CI job; the same external job admitted again gets its first record."""
        existing = self.store.find_by_external_id(admission.source, admission.external_id)
        if existing is not None:
            _, decision, workspace = self._redecide(existing)
            return Admitted(existing.id, decision, self._log_path(existing), workspace, new=False)
        identity = admission.identity
        decision = decide(self.policy, identity, admission.spec,
                          Usage(running_by_account=self._active_by_account()))
        job_id = new_job_id()
        log_path = job_dir(self.config, job_id) / "output.log"
        workspace = admission.workspace or job_dir(self.config, job_id) / "workspace"
        self.store.add_job(source=admission.source, external_id=admission.external_id,
                           identity=identity.to_json(), spec=admission.spec.to_json(), job_id=job_id,
                           log_path=log_path)
        if admission.log_preamble:
            self._write_log(log_path, admission.log_preamble)
        if not decision.allowed:
            self._write_log(log_path, "hpc-runner: denied by policy:\n"
                            + "".join(f"  - {reason}\n" for reason in decision.reasons))
        self.store.record_decision(job_id, actor=identity.actor_principal,
                                   decision=decision.to_json() | {"workspace": str(workspace)})
        log.info("job admitted" if decision.allowed else "job denied", job=job_id, source=admission.source,
                 external_id=admission.external_id, actor=identity.actor_principal, grant=decision.grant,
                 reasons=list(decision.reasons))
        return Admitted(job_id, decision, log_path, workspace, new=True)

    def note(self, job_id: str, text: str) -> None:
        record = self.store.get_job(job_id)
        if record is None:
            raise UnknownJob(f"no job {job_id}")
        self._write_log(self._log_path(record), text)

    def fail(self, job_id: str, detail: str) -> Ended:
        record = self.store.get_job(job_id)
        if record is None:
            raise UnknownJob(f"no job {job_id}")
        if not record.state.is_terminal:
            self.store.set_state(job_id, JobState.infra_failed, outcome_detail=detail)
        self._report_final(job_id)
        return self._ended(job_id)

    def _ended(self, job_id: str) -> Ended:
        record = self.store.get_job(job_id)
        assert record is not None
        return Ended(record.state, record.exit_status, record.outcome_detail)

    async def run(self, job_id: str, *, sink: LogSink, cancel: asyncio.Event) -> Ended:
        """Run an admitted CI job to its end, its output fed to `sink`; `cancel` cancels it."""
        record = self.store.get_job(job_id)
        if record is None:
            raise UnknownJob(f"no job {job_id}")
        if record.state.is_terminal:
            return self._ended(job_id)
        task = asyncio.current_task()
        assert task is not None
        self._running[job_id] = _Running(cancel, task)
        self._sinks[job_id] = sink
        try:
            async with self._slots:
                record = self.store.get_job(job_id)
                assert record is not None
                if record.state != JobState.queued:
                    return self._ended(job_id)
                if cancel.is_set():
                    self._write_log(self._log_path(record), "hpc-runner: cancelled before it started\n")
                    self.store.set_state(job_id, JobState.cancelled,
                                         outcome_detail="cancelled before it started")
                    self._report_final(job_id)
                    return self._ended(job_id)
                try:
                    if self._slurm is not None:
                        await self._execute(record, cancel)
                    else:
                        await self._execute_locally_with_sink(record, cancel, sink)
                except Exception as exc:
                    log.exception("job failed in the agent", job=job_id)
                    self._fail(record, f"the agent could not run the job: {exc}")
            return self._ended(job_id)
        finally:
            self._sinks.pop(job_id, None)
            self._running.pop(job_id, None)
            self._maybe_finished()

    async def _execute_locally_with_sink(self, record: JobRecord, cancel: asyncio.Event,
                                         sink: LogSink) -> None:
        execution = asyncio.create_task(self._execute(record, cancel))
        current = self.store.get_job(record.id)
        assert current is not None
        await pump_log(self._log_path(record), offset=current.log_offset, done=execution.done, sink=sink)
        await execution

    async def resume(self, job_id: str, *, sink: LogSink, cancel: asyncio.Event) -> Ended:
        """Carry on with a CI job a previous agent had: follow it again, or deliver the rest of its log."""
        record = self.store.get_job(job_id)
        if record is None:
            raise UnknownJob(f"no job {job_id}")
        if record.state == JobState.queued:
            return await self.run(job_id, sink=sink, cancel=cancel)
        await self._reattached.wait()
        task = asyncio.current_task()
        assert task is not None
        self._running[job_id] = _Running(cancel, task)
        self._sinks[job_id] = sink
        try:
            record = self.store.get_job(job_id)
            assert record is not None
            running = self._found_running.pop(job_id, None)
            finished = self._found_finished.pop(job_id, None)
            if running is not None and self._slurm is not None:
                log.info("reattached to a Slurm job", job=job_id, slurm_id=running.slurm_id)
                await self._follow_slurm(self._slurm, job_id, running, cancel)
            else:
                await pump_log(self._log_path(record), offset=record.log_offset, done=lambda: True, sink=sink)
                if finished is not None:
                    self._finish(job_id, finished)
                elif not record.state.is_terminal:
                    self._finish(job_id, Outcome("infra_failed", None, "the agent stopped while the job "
                                                 "ran and cannot find it again"))
                else:
                    self._report_final(job_id)
            return self._ended(job_id)
        finally:
            self._sinks.pop(job_id, None)
            self._running.pop(job_id, None)
            self._maybe_finished()

    def _sink_for(self, job_id: str) -> Callable[[int, bytes], Any]:
        return self._sinks.get(job_id) or self._offset_sink(job_id)

    # -- control -------------------------------------------------------------------------------

    def may_control(self, identity: Identity, record: JobRecord) -> bool:
        """The submitter, an admin of the job's account, or the agent's own user."""
        if identity.user is not None and record.identity.get("user") == identity.user \
                and record.identity.get("source") == identity.source:
            return True
        if identity.source == "local" and identity.user is not None:
            try:
                import pwd
                if pwd.getpwnam(identity.user).pw_uid in (self._uid, 0):
                    return True
            except KeyError:
                pass
        account = (record.decision or {}).get("account")
        if account:
            principals = identity.principals()
            return any(admin.matches(p) for admin in self.policy.admins_of(account) for p in principals)
        return False

    def job_for(self, identity: Identity, job_id: str) -> JobRecord:
        record = self.store.get_job(job_id)
        if record is None:
            raise UnknownJob(f"no job {job_id}")
        if not self.may_control(identity, record):
            raise NotAllowed(f"job {job_id} belongs to {record.identity.get('user', '?')}; only they "
                             "or an admin of its account may see or cancel it")
        return record

    def visible_jobs(self, identity: Identity) -> list[JobRecord]:
        return [r for r in self.store.list_jobs() if self.may_control(identity, r)]

    def cancel(self, identity: Identity, job_id: str) -> JobRecord:
        record = self.job_for(identity, job_id)
        if record.state.is_terminal:
            return record
        self.store.append_audit(actor=identity.actor_principal, action="cancel", job_id=job_id, detail={})
        running = self._running.get(job_id)
        if running is not None:
            running.cancel.set()
            return record
        if self._slurm is not None and record.executor == "slurm" \
                and record.state in (JobState.pending, JobState.running):
            # Submitted before the agent restarted and not followed again yet: marking it
            # cancelled here would leave it running in Slurm. Its follower cancels it there.
            self._cancel_on_reattach.add(job_id)
            return record
        self._write_log(self._log_path(record),
                        f"hpc-runner: cancelled by {identity.actor_principal} before it started\n")
        record = self.store.set_state(job_id, JobState.cancelled, actor=identity.actor_principal,
                                      outcome_detail=f"cancelled by {identity.actor_principal} while queued")
        self._report_final(job_id)
        return record

    # -- execution -----------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            job_id = await self._queue.get()
            record = self.store.get_job(job_id)
            if record is None or record.state != JobState.queued:
                continue
            async with self._slots:
                record = self.store.get_job(job_id)
                if record is None or record.state != JobState.queued:
                    continue
                cancel = asyncio.Event()
                task = asyncio.current_task()
                assert task is not None
                self._running[job_id] = _Running(cancel, task)
                try:
                    await self._execute(record, cancel)
                except Exception as exc:  # one job's failure must not stop the worker
                    log.exception("job failed in the agent", job=job_id)
                    try:
                        self._fail(record, f"the agent could not run the job: {exc}")
                    except Exception:
                        log.exception("cannot record the job's failure", job=job_id)
                finally:
                    self._running.pop(job_id, None)
                    self._maybe_finished()

    def _fail(self, record: JobRecord, detail: str) -> None:
        """End a job the agent could not run as infra_failed, unless it already ended."""
        current = self.store.get_job(record.id)
        if current is None or current.state.is_terminal:
            return
        with contextlib.suppress(OSError):  # the state matters more than the note
            self._write_log(self._log_path(record), f"hpc-runner: {detail}\n")
        self.store.set_state(record.id, JobState.infra_failed, outcome_detail=detail)
        self._report_final(record.id)

    def _log_path(self, record: JobRecord) -> Path:
        return Path(record.log_path or job_dir(self.config, record.id) / "output.log")

    def _redecide(self, record: JobRecord) -> tuple[JobSpec, Decision, Path]:
        """The recorded job under the current policy: its spec, the decision and its workspace."""
        spec = spec_from_json(record.spec, f"job {record.id}")
        decision = decide(self.policy, _identity_from_record(record), spec)
        return spec, decision, Path((record.decision or {}).get("workspace", "/nonexistent"))

    async def _execute(self, record: JobRecord, cancel: asyncio.Event) -> None:
        spec, decision, workspace = self._redecide(record)
        log_path = self._log_path(record)
        if not decision.allowed:
            # The policy changed (SIGHUP) between admission and start: the new one rules.
            self._write_log(log_path, "hpc-runner: denied by the reloaded policy:\n"
                            + "".join(f"  - {r}\n" for r in decision.reasons))
            self.store.set_state(record.id, JobState.denied, outcome_detail="; ".join(decision.reasons))
            return
        try:
            _refuse_uncopied_workspace(record)
            prepared = await asyncio.to_thread(prepare_job, self.site, job_id=record.id, spec=spec,
                                               decision=decision, workspace=workspace)
        except (SandboxRefused, InfrastructureError) as exc:
            state = JobState.denied if isinstance(exc, SandboxRefused) else JobState.infra_failed
            self._write_log(log_path, f"hpc-runner: {exc}\n")
            self.store.set_state(record.id, state, outcome_detail=str(exc))
            if state != JobState.denied:  # denials are answered at admission, never as final statuses
                self._report_final(record.id)
            return
        if self._slurm is not None:
            await self._run_on_slurm(self._slurm, record, prepared, cancel)
            return
        self.store.set_state(record.id, JobState.running)
        self.store.append_audit(actor="agent", action="started", job_id=record.id,
                                detail={"argv": list(prepared.argv), "image": prepared.image.path,
                                        "image_sha256": prepared.image.sha256})
        outcome = await self._executor.run(local_launch(prepared, self._grace), cancel)
        await self._end(record.id, outcome)

    async def _end(self, job_id: str, outcome: Outcome) -> None:
        """A job that ran has ended: its results go back to the submitted directory before its
        final state is recorded, so whoever sees the state finds the results in place."""
        record = self.store.get_job(job_id)
        if record is not None and not record.state.is_terminal:
            await self._return_workspace(record)
        self._finish(job_id, outcome)

    async def _return_workspace(self, record: JobRecord) -> None:
        try:
            returned = await asyncio.to_thread(return_workspace, self.config, record.id)
        except (WorkspaceError, OSError) as exc:
            log.warning("results not copied back", job=record.id, error=str(exc))
            self._write_log(self._log_path(record), f"hpc-runner: results not copied back: {exc}; they stay "
                                                    f"in {job_dir(self.config, record.id) / 'workspace'}\n")
            return
        if returned is None:
            return
        log.info("results copied back", job=record.id, files=returned.files, bytes=returned.bytes,
                 not_returned=len(returned.not_returned))
        if returned.not_returned:
            self._write_log(self._log_path(record), "hpc-runner: not copied back to "
                            f"{(record.decision or {}).get('submitted_workspace')}: "
                            f"{_first_few(returned.not_returned)}\n")

    def _finish(self, job_id: str, outcome: Outcome) -> None:
        """Record a job's end and report its final status exactly once, across restarts."""
        current = self.store.get_job(job_id)
        if current is not None and not current.state.is_terminal:
            self.store.set_state(job_id, JobState(outcome.state), exit_status=outcome.exit_status,
                                 outcome_detail=outcome.detail)
        self._report_final(job_id)

    def _report_final(self, job_id: str) -> None:
        if self.store.mark_final_reported(job_id):
            record = self.store.get_job(job_id)
            assert record is not None
            self.store.append_audit(actor="agent", action="final_status", job_id=job_id,
                                    detail={"state": str(record.state), "exit_status": record.exit_status,
                                            "detail": record.outcome_detail})
            log.info("job finished", job=job_id, state=str(record.state), exit_status=record.exit_status)

    # -- Slurm ---------------------------------------------------------------------------------

    async def _run_on_slurm(self, slurm: SlurmExecutor, record: JobRecord, prepared: PreparedJob,
                            cancel: asyncio.Event) -> None:
        # Recorded before sbatch, so a restart between the two looks for the job by its name.
        self.store.set_slurm_id(record.id, None, "slurm")
        self.store.set_state(record.id, JobState.pending)
        try:
            job = await slurm.submit(prepared, comment=record.external_id or f"hpc-runner job {record.id}")
        except SubmissionFailed as exc:
            self._finish(record.id, Outcome("failed", None, f"Slurm refused the job: {exc.slurm_message}"))
            return
        except SlurmUnavailable as exc:
            self._finish(record.id, Outcome("infra_failed", None, f"could not submit to Slurm: {exc}"))
            return
        assert job.slurm_id is not None
        self.store.set_slurm_id(record.id, job.slurm_id, "slurm")
        self.store.append_audit(actor="agent", action="submitted", job_id=record.id,
                                detail={"slurm_id": job.slurm_id, "image": prepared.image.path,
                                        "image_sha256": prepared.image.sha256})
        await self._follow_slurm(slurm, record.id, job, cancel)

    async def _follow_slurm(self, slurm: SlurmExecutor, job_id: str, job: SlurmJob,
                            cancel: asyncio.Event) -> None:
        record = self.store.get_job(job_id)
        assert record is not None

        def running() -> None:
            current = self.store.get_job(job_id)
            if current is not None and current.state == JobState.pending:
                self.store.set_state(job_id, JobState.running)

        outcome = await follow_slurm_job(slurm, job, offset=record.log_offset, sink=self._sink_for(job_id),
                                         cancel=cancel, grace_seconds=self._grace, on_running=running)
        if outcome.retryable and not cancel.is_set() \
                and await self._resubmit_after_node_failure(slurm, job_id, outcome, cancel):
            return
        await self._end(job_id, outcome)

    async def _resubmit_after_node_failure(self, slurm: SlurmExecutor, job_id: str, outcome: Outcome,
                                           cancel: asyncio.Event) -> bool:
        """Submit a job a failed node ended once more, if its account allows; False: it ends here.

        The policy decides again (it may have been reloaded since the job was admitted), and the
        "resubmitted" audit entry, written before sbatch, keeps it to one retry across restarts.
        """
        record = self.store.get_job(job_id)
        if record is None or record.state.is_terminal:
            return False
        log_path = self._log_path(record)
        if any(entry.action == "resubmitted" for entry in self.store.audit_entries(job_id=job_id)):
            self._write_log(log_path, f"hpc-runner: {outcome.detail}; it was already submitted again "
                                      "once, so it ends here\n")
            return False
        spec, decision, workspace = self._redecide(record)
        if not decision.allowed or not decision.retry_node_failure:
            why = "the policy no longer allows the job" if not decision.allowed else \
                f"account {decision.account} does not retry node failures (retry_node_failures)"
            self._write_log(log_path, f"hpc-runner: {outcome.detail}; not submitted again: {why}\n")
            return False
        self.store.append_audit(actor="agent", action="resubmitted", job_id=job_id,
                                detail={"reason": outcome.detail, "previous_slurm_id": record.slurm_id})
        self._write_log(log_path, f"hpc-runner: {outcome.detail}; submitting it again, once, as account "
                                  f"{decision.account} allows (retry_node_failures)\n")
        log.warning("a node failed under a job; submitting it again", job=job_id, slurm_id=record.slurm_id)
        try:
            _refuse_uncopied_workspace(record)
            prepared = await asyncio.to_thread(prepare_job, self.site, job_id=job_id, spec=spec,
                                               decision=decision, workspace=workspace)
        except (SandboxRefused, InfrastructureError) as exc:
            self._write_log(log_path, f"hpc-runner: cannot submit the job again: {exc}\n")
            return False
        await self._run_on_slurm(slurm, record, prepared, cancel)
        return True

    def _offset_sink(self, job_id: str) -> Callable[[int, bytes], Any]:
        """The local queue's log sink: the log file is the delivery; the offset is what was read."""
        async def sink(offset: int, data: bytes) -> None:
            if not data:  # the file restarted from 0 (truncated or rotated)
                self.store.set_log_offset(job_id, 0, reset=True)
            else:
                self.store.set_log_offset(job_id, offset + len(data))
        return sink

    async def _reattach(self, slurm: SlurmExecutor) -> None:
        try:
            await self._reattach_jobs(slurm)
        finally:
            self._reattached.set()

    async def _reattach_jobs(self, slurm: SlurmExecutor) -> None:
        """Find the jobs a previous agent had in Slurm: follow the live ones, finish the rest.

        Jobs of CI sources are only looked up: their sources `resume` them with their log sinks.
        """
        records = [r for r in self.store.list_jobs(states=[JobState.pending, JobState.running])
                   if r.executor == "slurm"]
        known = [SlurmJob(r.id, job_dir(self.config, r.id), self._log_path(r), r.slurm_id) for r in records]
        delay = 1.0
        while True:
            try:
                found = await slurm.reconcile(known)
                break
            except SlurmUnavailable as exc:
                log.warning("cannot reach Slurm to reattach jobs; retrying", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
        sources = {r.id for r in records if r.source != "local"}
        for job_id, job in found.running.items():
            if job.slurm_id is not None:
                self.store.set_slurm_id(job_id, job.slurm_id, "slurm")
            if job_id in sources:  # its source follows it again, with its own log sink (`resume`)
                self._found_running[job_id] = job
                continue
            log.info("reattached to a Slurm job", job=job_id, slurm_id=job.slurm_id)
            self._spawn_follower(slurm, job_id, job)
        for job_id, outcome in found.finished.items():
            self._cancel_on_reattach.discard(job_id)
            if job_id in sources:
                self._found_finished[job_id] = outcome
                continue
            record = self.store.get_job(job_id)
            assert record is not None
            try:
                # What the job wrote after the last agent stopped reading still has to be delivered.
                await pump_log(self._log_path(record), offset=record.log_offset, done=lambda: True,
                               sink=self._offset_sink(job_id))
                await self._end(job_id, outcome)
            except Exception:  # one job's trouble must not keep the others from their final status
                log.exception("cannot record the end of a Slurm job that ended while the agent was down",
                              job=job_id)
        for row in found.unknown_hpcr:
            log.warning("a Slurm job named like ours is not in the agent's records; an admin should look",
                        slurm_id=row.slurm_id, name=row.name, state=row.state)
            self.store.append_audit(actor="agent", action="unknown_slurm_job",
                                    detail={"slurm_id": row.slurm_id, "name": row.name, "state": row.state})

    def _spawn_follower(self, slurm: SlurmExecutor, job_id: str, job: SlurmJob) -> None:
        cancel = asyncio.Event()
        if job_id in self._cancel_on_reattach:
            self._cancel_on_reattach.discard(job_id)
            cancel.set()

        async def follow_it() -> None:
            try:
                await self._follow_slurm(slurm, job_id, job, cancel)
            except Exception as exc:
                log.exception("lost track of a reattached job", job=job_id)
                record = self.store.get_job(job_id)
                if record is not None:
                    self._fail(record, f"the agent lost track of the Slurm job: {exc}")
            finally:
                self._running.pop(job_id, None)
                self._maybe_finished()

        task = asyncio.create_task(follow_it())
        self._running[job_id] = _Running(cancel, task)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._recover()
        if self._slurm is not None:
            task = asyncio.create_task(self._reattach(self._slurm))
            self._background.add(task)
            task.add_done_callback(self._background_done)
        else:
            self._reattached.set()
        self._workers = [asyncio.create_task(self._worker()) for _ in range(self.config.max_jobs)]

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Jobs it did not reach stay pending or running until the next start finds them.
            log.error("reattaching to Slurm jobs failed; restart the agent to try again",
                      error=repr(task.exception()))

    def _recover(self) -> None:
        """Jobs a previous agent left behind: queued ones run, local runs cannot be reattached."""
        for record in self.store.list_jobs(states=[JobState.queued], source="local"):
            self._queue.put_nowait(record.id)
        for record in self.store.list_jobs():
            # ended, but the previous agent stopped before it reported the final status
            if record.state.is_terminal and record.state != JobState.denied and not record.final_reported:
                self._report_final(record.id)
        for record in self.store.list_jobs(states=[JobState.running, JobState.pending]):
            if record.executor in (None, "local"):
                self._finish(record.id, Outcome("infra_failed", None,
                                                "the agent stopped while the job ran locally"))

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
        self.store.append_audit(actor="agent", action="policy_reload", detail={"ok": True})
        log.info("policy reloaded", grants=len(policy.grants))
        return True

    def drain(self) -> None:
        """First SIGTERM: take no new jobs, let running ones finish. Second: cancel them."""
        if self._accepting:
            self._accepting = False
            self._draining.set()
            for record in self.store.list_jobs(states=[JobState.queued], source="local"):
                if record.id not in self._running:
                    self.store.set_state(record.id, JobState.cancelled,
                                         outcome_detail="the agent shut down before the job started")
                    self._report_final(record.id)
            log.info("draining: no new jobs; running jobs finish", running=len(self._running))
        else:
            log.info("second SIGTERM: cancelling running jobs", running=len(self._running))
            self._stopping.set()
            for running in self._running.values():
                running.cancel.set()
        self._maybe_finished()

    def _maybe_finished(self) -> None:
        if not self._accepting and not self._running:
            self.finished.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.drain)
        loop.add_signal_handler(signal.SIGINT, self.drain)
        loop.add_signal_handler(signal.SIGHUP, self.reload_policy)

    async def stop_workers(self) -> None:
        for worker in [*self._workers, *self._background]:
            worker.cancel()
        await asyncio.gather(*self._workers, *self._background, return_exceptions=True)
        if self._slurm is not None:
            await self._slurm.close()


def slurm_executor(config: AgentConfig) -> SlurmExecutor:
    return SlurmExecutor(site=SlurmSite(srun=config.slurm.srun, mpi_plugin=config.slurm.mpi_plugin),
                         poll_interval=config.slurm.poll_interval)


def _refuse_uncopied_workspace(record: JobRecord) -> None:
    """A job queued by an agent that bound submitted directories by their path (before they were
    copied) is not started: its directory may have been swapped while it waited."""
    if "workspace_owner" in (record.decision or {}):
        raise SandboxRefused("this job was queued with its submitted directory as its workspace, which "
                             "is no longer done (it could be swapped while the job waits); submit it again")


def _first_few(items: list[str], shown: int = 10) -> str:
    return ", ".join(items[:shown]) + (f", and {len(items) - shown} more" if len(items) > shown else "")


def _identity_from_record(record: JobRecord) -> Identity:
    from runner.identity import identity_from_json
    return identity_from_json(record.identity, f"job {record.id}")
