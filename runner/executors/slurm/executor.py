"""Run prepared jobs as Slurm batch jobs: submit, watch, cancel, and find them again after a restart.

The job's output goes straight from Slurm into the job's log file (sbatch --output, in append
mode); the agent follows that file with `runner.logs.tail` as it does for local jobs. This module
only adds lines of its own to it: the submission, why the job pends, requeues, cancellation.

One `Tracker` follows every watched job with one squeue call per cycle; it runs while at least
one job is watched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from runner.errors import InfrastructureError
from runner.executors.slurm.cli import SlurmCli, SlurmUnavailable, SqueueRow, SubmissionFailed
from runner.executors.slurm.plan import EXIT_STATUS_NAME, SlurmSite, SubmitOptions, plan_batch
from runner.executors.slurm.states import (
    FINAL_STATES,
    PENDING_STATES,
    RETRYABLE,
    JobReport,
    interpret,
    interpret_missing,
    normalize_state,
    pending_line,
    pending_line_due,
    report_from_record,
)
from runner.executors.slurm.tracker import (
    DEFAULT_INTERVAL_SECONDS,
    DEFAULT_MAX_DELAY_SECONDS,
    Finished,
    JobNote,
    NodesGiven,
    PendingInfo,
    StateChanged,
    Tracker,
    TrackerEvent,
    read_exit_status,
    report_from_row,
)
from runner.job import Outcome, slurm_job_name
from runner.job.prepared import PreparedJob
from runner.units import human_duration

__all__ = ["QueueLimit", "Reconciliation", "SlurmExecutor", "SlurmJob", "append_log_line"]

log = logging.getLogger(__name__)

LOG_MODE = 0o640
SCRIPT_MODE = 0o600


@dataclass(frozen=True)
class SlurmJob:
    """A job handed to Slurm: what the agent keeps to watch it, and to find it after a restart."""

    job_id: str
    job_dir: Path
    log_path: Path
    # None only for a job whose sbatch answer never reached the store: `reconcile` finds it by name.
    slurm_id: str | None = None

    @property
    def status_path(self) -> Path:
        return self.job_dir / EXIT_STATUS_NAME


@dataclass(frozen=True)
class QueueLimit:
    """How long a job may pend in Slurm's queue: `seconds` from `since` (epoch seconds: when it was
    submitted, which a restarted agent reads from its record), so `deadline` holds across restarts."""

    seconds: int
    since: float

    @property
    def deadline(self) -> float:
        return self.since + self.seconds


@dataclass(frozen=True)
class Reconciliation:
    """What Slurm says about the jobs a restarted agent had in flight."""

    running: dict[str, SlurmJob]  # job id -> still pending or running in Slurm: watch it again
    finished: dict[str, Outcome]  # job id -> how it ended while nobody watched
    # Pending or running hpcr-* jobs of this account that none of the known jobs accounts for:
    # left over from a lost record, or a second submission of the same job.
    unknown_hpcr: list[SqueueRow]


class SlurmExecutor:
    """Slurm jobs for prepared jobs. One instance serves the whole agent."""

    def __init__(self, cli: SlurmCli | None = None, *, site: SlurmSite | None = None, user: str | None = None,
                 poll_interval: float = DEFAULT_INTERVAL_SECONDS,
                 max_poll_delay: float = DEFAULT_MAX_DELAY_SECONDS, tracker: Tracker | None = None) -> None:
        self.cli = cli or SlurmCli()
        self.site = site or SlurmSite()
        # Whose jobs `reconcile` looks at: the account that submits them (ours, unless the CLI
        # runs Slurm's commands as another).
        self.user = user or pwd.getpwuid(os.geteuid()).pw_name
        self.tracker = tracker or Tracker(self.cli, interval=poll_interval,
                                          max_delay=max(max_poll_delay, poll_interval))
        self._loop_task: asyncio.Task[None] | None = None
        self._interest: dict[str, int] = {}
        self._cancelled: set[str] = set()
        self._logs: dict[str, Path] = {}

    # -- submit ----------------------------------------------------------------------------------

    async def submit(self, prepared: PreparedJob, *, comment: str,
                     options: SubmitOptions | None = None) -> SlurmJob:
        """Write the batch script into the job's directory and sbatch it.

        SubmissionFailed (Slurm refused the job: mark it failed) and SlurmUnavailable (sbatch
        could not reach Slurm) are also written into the job's log, with Slurm's own words.
        """
        batch = plan_batch(prepared, comment=comment, site=self.site, options=options or SubmitOptions())
        job = SlurmJob(prepared.job_id, Path(prepared.job_dir), Path(prepared.log_path))
        _write_file(Path(batch.script_path), batch.script, SCRIPT_MODE)
        # A retry reuses the job's directory: the last attempt's status must not pass for this one's.
        with contextlib.suppress(FileNotFoundError):
            job.status_path.unlink()
        try:
            slurm_id = await self.cli.sbatch(batch.script, batch.args)
        except SubmissionFailed as exc:
            append_log_line(job.log_path, f"hpc-runner: sbatch refused the job: {exc.slurm_message}")
            raise
        except SlurmUnavailable as exc:
            append_log_line(job.log_path, f"hpc-runner: could not submit the job to Slurm: {exc}")
            raise
        append_log_line(job.log_path, f"hpc-runner: submitted to Slurm as job {slurm_id} ({batch.job_name})")
        self._logs[slurm_id] = job.log_path
        return SlurmJob(job.job_id, job.job_dir, job.log_path, slurm_id)

    # -- watch -----------------------------------------------------------------------------------

    async def watch(self, job: SlurmJob, *,
                    on_event: Callable[[TrackerEvent], None] | None = None) -> Outcome:
        """Wait for the job to end and return how it ended.

        Pending reasons, estimated starts and requeues go into the job's log as they change.
        `on_event` sees every tracker event of this job (for status reports). A job this
        executor was asked to cancel ends `cancelled`, however Slurm recorded its end.
        """
        if job.slurm_id is None:
            raise ValueError(f"job {job.job_id} has no Slurm job id; reconcile() finds it")
        slurm_id = job.slurm_id
        self._logs[slurm_id] = job.log_path
        # (reason, estimated start) of the last pending line written.
        written: dict[str, tuple[str | None, str | None]] = {}

        def write_lines(event: TrackerEvent) -> None:
            if isinstance(event, PendingInfo):
                current = (event.reason, event.estimated_start)
                # Right after submission Slurm has not looked at the job yet: nothing to say.
                says_something = event.reason not in (None, "None") or event.estimated_start is not None
                if says_something and pending_line_due(written.get("last"), current):
                    written["last"] = current
                    append_log_line(job.log_path, pending_line(event.reason, event.estimated_start))
            elif isinstance(event, JobNote):
                append_log_line(job.log_path, event.text)
            if on_event is not None:
                on_event(event)

        outcome = await self._await_final(slurm_id, job.status_path, write_lines)
        assert outcome is not None
        self._logs.pop(slurm_id, None)
        if slurm_id in self._cancelled and outcome.state == "failed":
            # The job ended on the SIGTERM of a cancellation: that is how it was cancelled.
            self._cancelled.discard(slurm_id)
            return Outcome("cancelled", outcome.exit_status, f"cancelled ({outcome.detail})")
        self._cancelled.discard(slurm_id)
        return outcome

    async def _await_final(self, slurm_id: str, status_path: Path | None,
                           listener: Callable[[TrackerEvent], None] | None = None,
                           timeout: float | None = None) -> Outcome | None:
        """The job's outcome once the tracker sees it end; None if `timeout` passes first."""
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[Outcome] = loop.create_future()

        def on_event(event: TrackerEvent) -> None:
            if listener is not None:
                listener(event)
            if isinstance(event, Finished) and not finished.done():
                finished.set_result(event.outcome)

        self.tracker.track(slurm_id, status_path)
        unsubscribe = self.tracker.listen(on_event, slurm_id)
        self._interest[slurm_id] = self._interest.get(slurm_id, 0) + 1
        self._ensure_polling()
        try:
            if timeout is None:
                return await finished
            try:
                return await asyncio.wait_for(asyncio.shield(finished), timeout)
            except TimeoutError:
                return None
        finally:
            unsubscribe()
            self._interest[slurm_id] -= 1
            if not self._interest[slurm_id]:
                del self._interest[slurm_id]
                # Nobody waits for it any more (a watcher was cancelled): stop asking Slurm.
                self.tracker.forget(slurm_id)

    def _ensure_polling(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self.tracker.run(), name="slurm-tracker")
        else:
            self.tracker.wake()

    async def follow(self, job: SlurmJob, *, cancel: asyncio.Event, grace_seconds: float,
                     on_running: Callable[[], None] | None = None,
                     on_event: Callable[[TrackerEvent], None] | None = None,
                     queue_limit: QueueLimit | None = None) -> Outcome:
        """Watch a submitted job to its end; setting `cancel` cancels it in Slurm (with the grace
        period), however long Slurm takes to answer. `on_running` is called once it runs, and
        `on_event` with every tracker event of the job (its pending reason, its nodes...).
        `queue_limit`: a job still pending in Slurm when it passes is taken out of the queue and
        ends `expired`, saying how long it waited and Slurm's last reason why."""
        ran = asyncio.Event()
        reason: list[str] = []  # Slurm's last pending reason

        def heard(event: TrackerEvent) -> None:
            if isinstance(event, StateChanged) and event.phase == "running":
                ran.set()
                if on_running is not None:
                    on_running()
            elif isinstance(event, NodesGiven):
                ran.set()
            elif isinstance(event, PendingInfo) and event.reason not in (None, "", "None"):
                reason[:] = [str(event.reason)]
            if on_event is not None:
                on_event(event)

        watch = asyncio.create_task(self.watch(job, on_event=heard))
        canceller: asyncio.Task[None] | None = None
        expiry: asyncio.Task[str | None] | None = None
        if queue_limit is not None and job.slurm_id is not None:
            expiry = asyncio.create_task(self._expire(job, queue_limit, ran, reason))
        try:
            waiter = asyncio.create_task(cancel.wait())
            await asyncio.wait({watch, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if not watch.done() and job.slurm_id is not None:
                canceller = asyncio.create_task(self._cancel_until_answered(job.slurm_id, grace_seconds))
            outcome = await watch
            expired = expiry.result() if expiry is not None and expiry.done() and not expiry.cancelled() \
                and expiry.exception() is None else None
            if expired is not None and not ran.is_set() and outcome.state == "cancelled" \
                    and not cancel.is_set():
                return Outcome("expired", None, expired)
            return outcome
        finally:
            for task in (watch, canceller, expiry):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    async def _expire(self, job: SlurmJob, limit: QueueLimit, ran: asyncio.Event,
                      reason: list[str]) -> str | None:
        """Once `limit` passes, take the job out of Slurm's queue if it still pends there; what its
        end then says (None: it ran, or started before Slurm took it out)."""
        assert job.slurm_id is not None
        wait = limit.deadline - time.time()
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ran.wait(), wait)
        delay = 1.0
        while not ran.is_set():
            try:
                rows = await self.cli.squeue([job.slurm_id])
                row = rows.get(job.slurm_id)
                if row is None or normalize_state(row.state) != "PENDING":
                    return None  # started (or already ended): the job goes on as it is
                why = row.reason if row.reason not in ("", "None") else (reason[0] if reason else None)
                waited = human_duration(max(0, round(time.time() - limit.since)))
                detail = (f"waited {waited} in Slurm's queue, past its queue_time of "
                          f"{human_duration(limit.seconds)}"
                          + (f" (Slurm's reason: {why})" if why else "")
                          + "; taken out of the queue before it started")
                self._note(job.log_path, f"hpc-runner: expired: {detail}")
                # Only while it still pends: a job that starts meanwhile runs on.
                await self.cli.scancel(job.slurm_id, pending_only=True)
                self.tracker.wake()
                return detail
            except SlurmUnavailable:
                await asyncio.sleep(delay)  # Slurm's controller is briefly away: ask again
                delay = min(delay * 2, 30.0)
        return None

    async def _cancel_until_answered(self, slurm_id: str, grace_seconds: float) -> None:
        # Slurm may be briefly unreachable (a controller restart): keep asking until it answers.
        delay = 1.0
        while True:
            try:
                await self.cancel(slurm_id, grace_seconds)
                return
            except SlurmUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    # -- cancel ----------------------------------------------------------------------------------

    async def cancel(self, slurm_id: str, grace_seconds: float) -> None:
        """Cancel a job: a pending one at once; a running one gets SIGTERM, then after
        `grace_seconds` (if it is still there) `scancel`, after which Slurm sends SIGKILL once its
        KillWait has passed.

        SIGTERM goes to the job's steps only (`scancel --signal=TERM`, not `--full`): srun, when
        signalled itself, kills the ranks at once, and the batch script must live on to record
        the exit status. Raises SlurmUnavailable when Slurm cannot be asked.
        """
        self._cancelled.add(slurm_id)
        rows = await self.cli.squeue([slurm_id])
        row = rows.get(slurm_id)
        if row is None or normalize_state(row.state) in FINAL_STATES:
            return
        log_path = self._logs.get(slurm_id)
        if normalize_state(row.state) in PENDING_STATES:
            self._note(log_path, "hpc-runner: job cancelled before it started")
            await self.cli.scancel(slurm_id)
            self.tracker.wake()
            return
        self._note(log_path, "hpc-runner: job cancelled; sent SIGTERM")
        await self.cli.scancel(slurm_id, signal="TERM")
        if await self._await_final(slurm_id, None, timeout=max(grace_seconds, 0.0)) is not None:
            return
        self._note(log_path, f"hpc-runner: job cancelled; still running after {grace_seconds:g} s, "
                             "cancelled in Slurm (SIGKILL follows after Slurm's KillWait)")
        await self.cli.scancel(slurm_id)
        self.tracker.wake()

    def _note(self, log_path: Path | None, text: str) -> None:
        if log_path is not None:
            append_log_line(log_path, text)

    # -- reconcile -------------------------------------------------------------------------------

    async def reconcile(self, known: Iterable[SlurmJob]) -> Reconciliation:
        """Match the jobs a restarted agent had in flight with what Slurm knows.

        One squeue call lists every hpcr-* job of the account in any state Slurm still remembers;
        a job recorded without a Slurm id is found by its name (the newest of that name). A job
        that ended gets its outcome (exit-status file first, Slurm's exit code second); a job
        Slurm no longer knows ends infra_failed unless its exit-status file tells more.
        """
        rows = await self.cli.list_hpcr_jobs(self.user)
        by_id = {row.slurm_id: row for row in rows}
        newest_by_name: dict[str, str] = {}
        for row in sorted(rows, key=lambda r: int(r.slurm_id)):
            newest_by_name[row.name] = row.slurm_id
        running: dict[str, SlurmJob] = {}
        finished: dict[str, Outcome] = {}
        claimed: set[str] = set()
        for job in known:
            slurm_id = job.slurm_id or newest_by_name.get(slurm_job_name(job.job_id))
            if slurm_id is None:
                finished[job.job_id] = _never_seen(job)
                continue
            claimed.add(slurm_id)
            found = SlurmJob(job.job_id, job.job_dir, job.log_path, slurm_id)
            listed = by_id.get(slurm_id)
            report: JobReport | None
            if listed is not None:
                report = report_from_row(listed)
            else:
                # Not listed under this account's name: scontrol knows every job, or none.
                record = await self.cli.show_job(slurm_id)
                report = report_from_record(record) if record is not None else None
            exit_status = read_exit_status(found.status_path)
            if report is None:
                status = interpret_missing(slurm_id, exit_status)
            elif report.state not in FINAL_STATES:
                running[job.job_id] = found
                continue
            else:
                status = interpret(report, exit_status=exit_status, was_running=False)
            if status.outcome is None:
                running[job.job_id] = found
            else:
                finished[job.job_id] = status.outcome
        unknown = [row for row in rows
                   if row.slurm_id not in claimed and normalize_state(row.state) not in FINAL_STATES]
        return Reconciliation(running, finished, unknown)

    # -- shutdown --------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop polling (jobs keep running in Slurm; `reconcile` finds them again)."""
        task, self._loop_task = self._loop_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def append_log_line(path: Path, text: str) -> None:
    """Append a line of ours to a job's log, on a line of its own.

    Best effort: the log is the job's, and a full disk must not turn into a lost job.
    """
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags | os.O_EXCL, LOG_MODE)
            # The agent's umask must not decide who may read job logs.
            os.fchmod(fd, LOG_MODE)
        except FileExistsError:
            fd = os.open(path, flags, LOG_MODE)
    except OSError as exc:
        log.warning("cannot write to the job log %s: %s", path, exc.strerror)
        return
    try:
        size = os.fstat(fd).st_size
        unfinished = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        os.write(fd, (b"\n" if unfinished else b"") + text.encode() + b"\n")
    except OSError as exc:
        log.warning("cannot write to the job log %s: %s", path, exc.strerror)
    finally:
        os.close(fd)


def _write_file(path: Path, text: str, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise InfrastructureError(f"cannot write the batch script {path}: {exc.strerror}") from None


def _never_seen(job: SlurmJob) -> Outcome:
    status = read_exit_status(job.status_path)
    if status is not None:
        outcome = interpret_missing(slurm_job_name(job.job_id), status).outcome
        assert outcome is not None
        return outcome
    return Outcome("infra_failed", None,
                   f"Slurm has no job named {slurm_job_name(job.job_id)}: it was never submitted, or it "
                   f"ended longer ago than Slurm remembers; {RETRYABLE}")
