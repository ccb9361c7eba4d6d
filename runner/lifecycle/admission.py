"""Admission: the one place where a job of any source is decided under the policy and recorded.

Every source (the local queue, Buildkite, GitHub, `hpc-runner run`) hands in an `Admission`;
the policy decides with the account's running jobs counted, a local job's submitted directory is
copied into the job's own directory, and the job and its decision are recorded. A CI job admitted
again (a restarted source asking once more) gets its first record back.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runner.errors import InputError
from runner.identity import Identity, identity_from_json
from runner.job import JobRecord, JobState, new_job_id
from runner.lifecycle.access import NotAllowed
from runner.lifecycle.notes import Notes
from runner.lifecycle.prepare import Site, job_dir, take_workspace
from runner.logging_setup import get_logger
from runner.policy import Decision, Policy, Usage, decide
from runner.spec import JobSpec, spec_from_json
from runner.store import Store
from sandbox.workspace import WorkspaceError

log = get_logger("runner.lifecycle")

# States a job holds a place in its account's max_concurrent_jobs in: the local queue is the
# account's queue, so waiting for a free slot counts as much as running.
COUNTED_STATES = (JobState.queued, JobState.pending, JobState.running)


@dataclass(frozen=True)
class SubmittedWorkspace:
    """A directory a local user offers as the job's workspace: the job gets a copy of it, never the
    directory itself, which its owner could swap for a link to anything the agent can read while
    the job waits. `owner` is the uid it must belong to (None: the agent's own account or root,
    which may offer any directory)."""

    path: Path
    owner: int | None


@dataclass(frozen=True)
class Admission:
    """A trusted job from a source."""

    source: str
    # The source's own id for the job (CI sources); admitting it again gives the first record.
    external_id: str | None
    identity: Identity
    spec: JobSpec
    # None: the job gets a new directory of its own (a CI source checks out into it).
    submitted: SubmittedWorkspace | None = None
    # A directory the job binds as it is: only `hpc-runner run`, whose caller is the job's user.
    workspace: Path | None = None
    # The source's own lines (signature verified, notes) that open the job's log.
    log_preamble: str = ""
    # Where the job came from, as a page people can open (the Buildkite job, the pull request):
    # what the dashboards and the hub link the job to. None: nowhere (local and API jobs).
    source_url: str | None = None


@dataclass(frozen=True)
class Admitted:
    job_id: str
    decision: Decision
    log_path: Path
    workspace: Path
    # False when this external job was admitted before (a restarted source asking again).
    new: bool


class Admissions:
    def __init__(self, site: Site, store: Store, notes: Notes, *,
                 accepting: Callable[[], bool] = lambda: True) -> None:
        self.site = site
        self.store = store
        self._notes = notes
        self._accepting = accepting
        self._uid = os.geteuid()
        self._watchers: list[Callable[[str], None]] = []

    def watch(self, watcher: Callable[[str], None]) -> None:
        """Call `watcher` with the id of each job recorded from now on, once its decision is."""
        self._watchers.append(watcher)

    async def admit(self, admission: Admission) -> Admitted:
        """Decide and record; raises NotAllowed when the agent takes no new jobs, InputError when
        a submitted directory cannot be copied (nothing is recorded then)."""
        if admission.external_id is not None:
            existing = self.store.find_by_external_id(admission.source, admission.external_id)
            if existing is not None:
                _, decision = redecide(self.site.policy, existing)
                return Admitted(existing.id, decision, log_path_of(self.site, existing),
                                workspace_of(existing), new=False)
        if admission.submitted is not None:
            # The local queue refuses new jobs once the agent drains. A CI job is admitted even
            # then: its service handed it over already, and its source reports how it ends.
            self._refuse_when_closed()
        decision = decide(self.site.policy, admission.identity, admission.spec,
                          Usage(running_by_account=self._active_by_account()))
        job_id = new_job_id()
        log_path = job_dir(self.site.config, job_id) / "output.log"
        payload = decision.to_json()
        workspace = admission.workspace or job_dir(self.site.config, job_id) / "workspace"
        if admission.submitted is not None:
            payload |= {"submitted_workspace": str(admission.submitted.path)}
            if decision.allowed:
                payload |= await self._take(job_id, admission.submitted)
                workspace = Path(payload["workspace"])
        else:
            payload |= {"workspace": str(workspace)}
        self.store.add_job(source=admission.source, external_id=admission.external_id,
                           identity=admission.identity.to_json(), spec=admission.spec.to_json(),
                           job_id=job_id, log_path=log_path, source_url=admission.source_url)
        if admission.log_preamble:
            self._notes(log_path, admission.log_preamble)
        self.store.record_decision(job_id, actor=admission.identity.actor_principal, decision=payload)
        if not decision.allowed:
            self._notes(log_path, "hpc-runner: denied by policy:\n"
                        + "".join(f"  - {reason}\n" for reason in decision.reasons))
        log.info("job admitted" if decision.allowed else "job denied", job=job_id, source=admission.source,
                 external_id=admission.external_id, actor=admission.identity.actor_principal,
                 grant=decision.grant, reasons=list(decision.reasons))
        for watcher in list(self._watchers):
            try:
                watcher(job_id)
            except Exception:  # a watcher's trouble is its own; the job goes on
                log.exception("an admission watcher failed", job=job_id)
        return Admitted(job_id, decision, log_path, workspace, new=True)

    def _refuse_when_closed(self) -> None:
        if not self._accepting():
            raise NotAllowed("the agent is shutting down and takes no new jobs")

    async def _take(self, job_id: str, submitted: SubmittedWorkspace) -> dict[str, object]:
        try:
            taken = await asyncio.to_thread(take_workspace, self.site.config, job_id, submitted.path,
                                            owner=submitted.owner, agent_uid=self._uid)
        except (WorkspaceError, OSError) as exc:
            raise InputError(str(exc) if isinstance(exc, WorkspaceError)
                             else f"workspace {submitted.path}: {exc.strerror}") from None
        if not self._accepting():  # the agent began to drain while the copy was made
            shutil.rmtree(job_dir(self.site.config, job_id), ignore_errors=True)
            self._refuse_when_closed()
        if taken.snapshot.left_out:  # the log is the job's own output: the agent speaks only of trouble
            self._notes(job_dir(self.site.config, job_id) / "output.log",
                        "hpc-runner: not copied into the job's workspace (not a file, directory or "
                        f"link): {first_few(taken.snapshot.left_out)}\n")
        log.info("workspace copied", job=job_id, submitted=str(submitted.path),
                 entries=len(taken.snapshot.entries), bytes=taken.snapshot.bytes)
        return {"workspace": str(taken.path), "workspace_origin": taken.snapshot.origin.to_json()}

    def _active_by_account(self) -> dict[str, int]:
        return self.store.count_by_account(COUNTED_STATES)

def redecide(policy: Policy, record: JobRecord) -> tuple[JobSpec, Decision]:
    """The recorded job under `policy` (which may have been reloaded since it was admitted)."""
    spec = spec_from_json(record.spec, f"job {record.id}")
    return spec, decide(policy, identity_from_json(record.identity, f"job {record.id}"), spec)


def log_path_of(site: Site, record: JobRecord) -> Path:
    return Path(record.log_path or job_dir(site.config, record.id) / "output.log")


def workspace_of(record: JobRecord) -> Path:
    return Path((record.decision or {}).get("workspace", "/nonexistent"))


def first_few(items: list[str], shown: int = 10) -> str:
    return ", ".join(items[:shown]) + (f", and {len(items) - shown} more" if len(items) > shown else "")
