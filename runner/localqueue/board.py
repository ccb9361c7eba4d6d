"""The dashboard's jobs on an agent: its own store's, as the agent's rules let each local user see them.

A viewer (the local user on the other end of the agent's dashboard socket) sees a job when the
agent's `may_control` lets them (its submitter, the agent's own user or root, an admin of its
account), and also when they are a member of its account: one of the principals of the policy's
grants that spend that account, matched as the policy matches them. Members see, they do not
cancel.

A page is one query of the store (newest first along the creation time, filtered there), never
every job. The logs are the jobs' log files, which the jobs append to: a waiting follower wakes
at each change of the job's state (the lifecycle's watchers) and otherwise looks at the file's
size every `LOG_POLL_SECONDS`; a stat of a local file that often costs nothing, and a log that
grows shows up within that time.
"""

from __future__ import annotations

import asyncio
import functools
import os
import pwd
import stat
from pathlib import Path

from runner.agent import Agent, ReplayRefused
from runner.errors import InputError
from runner.gateway.outputs import OutputRefused, RecordedOutput, check_output_path, find_output, parse_record
from runner.identity import Identity, identity_from_json
from runner.job import OUTPUTS_DIR, JobRecord, JobState
from runner.job.waiting import waiting_reason
from runner.logs.redact import read_masked, secret_needles, secret_values
from runner.provenance.outputs import open_under
from runner.sources.api.publish import source_link
from runner.store import JobFilter, Visible
from runner.tasks import pause
from runner.units import human_duration, slurm_memory
from runner.web.board import (
    JobCard,
    JobDetail,
    ListQuery,
    NotCancellable,
    NotReplayable,
    NotVisible,
    OpenedOutput,
    OutputEntry,
    Page,
    Resources,
    SourceLink,
    Viewer,
)

LOG_POLL_SECONDS = 0.2
# What one read of a log gives at most, however much is asked.
MAX_READ_BYTES = 4 * 1024 * 1024


def identity_of(viewer: Viewer) -> Identity:
    """The local identity a viewer's principals (`local:user:U`, `local:group:G`) name."""
    user: str | None = None
    groups: list[str] = []
    for principal in viewer.principals:
        source, _, rest = principal.partition(":")
        kind, _, value = rest.partition(":")
        if source != "local" or not value:
            continue
        if kind == "user" and user is None:
            user = value
        elif kind == "group":
            groups.append(value)
    return Identity(source="local", user=user, groups=tuple(groups))


class AgentBoard:
    """`runner.web.board.JobBoard` over the agent's store and lifecycle (see the module's text)."""

    def __init__(self, agent: Agent, *, cluster: str | None = None,
                 log_poll: float = LOG_POLL_SECONDS) -> None:
        self._agent = agent
        self._cluster = cluster
        self._log_poll = log_poll
        self._any_change = asyncio.Event()
        self._job_change: dict[str, asyncio.Event] = {}
        # What the pages show of a log never holds the job's secrets (as what the hub gets).
        buildkite = agent.config.buildkite
        self._redacted_vars = buildkite.redacted_vars if buildkite is not None else ()
        # Per job, the log's size when a read left out a tail that may begin a secret: a wait for
        # more of the log waits until the log grows past it.
        self._held_at: dict[str, int] = {}
        agent.driver.watch_every(lambda record: self._changed(record.id))
        agent.admissions.watch(self._changed)

    # -- who sees what -----------------------------------------------------------------------------

    def _sees_everything(self, identity: Identity) -> bool:
        """The agent's own user and root (as `may_control` has them)."""
        if identity.user is None:
            return False
        try:
            return pwd.getpwnam(identity.user).pw_uid in (self._agent_uid, 0)
        except KeyError:
            return False

    @property
    def _agent_uid(self) -> int:
        return os.geteuid()

    def _member_accounts(self, identity: Identity) -> frozenset[str]:
        """The accounts whose jobs the identity sees: it is an admin of the account, or one of the
        principals of a grant that spends it."""
        principals = identity.principals()
        policy = self._agent.policy
        found = {grant.account for grant in policy.grants
                 if any(pattern.matches(p) for pattern in grant.principals for p in principals)}
        found |= {name for name, account in policy.accounts.items()
                  if any(admin.matches(p) for admin in account.admins for p in principals)}
        return frozenset(found)

    def _may_see(self, identity: Identity, record: JobRecord) -> bool:
        if self._agent.may_control(identity, record):
            return True
        account = (record.decision or {}).get("account")
        return bool(account) and account in self._member_accounts(identity)

    def _visible_record(self, viewer: Viewer, job_id: str) -> tuple[Identity, JobRecord]:
        identity = identity_of(viewer)
        record = self._agent.job(job_id)
        if record is None or not self._may_see(identity, record):
            raise NotVisible(job_id)
        return identity, record

    # -- the list and a job ------------------------------------------------------------------------

    async def page(self, viewer: Viewer, query: ListQuery) -> Page:
        identity = identity_of(viewer)
        everything = self._sees_everything(identity)
        members = self._member_accounts(identity)
        visible = None if everything else Visible("local", identity.user, members)
        where = JobFilter(states=query.states, account=query.account, source=query.source, text=query.text)
        store = self._agent.store
        records = store.page_jobs(where, visible=visible, before=query.before, limit=query.limit + 1)
        shown = records[:query.limit]
        started = store.started_times(record.id for record in shown)
        cards = [self._card(record, started.get(record.id)) for record in shown]
        accounts = sorted(self._agent.policy.accounts) if everything else sorted(members)
        following = shown[-1].id if len(records) > query.limit else None
        return Page(cards, following, accounts)

    async def detail(self, viewer: Viewer, job_id: str) -> JobDetail:
        identity, record = self._visible_record(viewer, job_id)
        return self._detail(identity, record)

    def _detail(self, identity: Identity, record: JobRecord) -> JobDetail:
        started = self._agent.store.started_times([record.id]).get(record.id)
        decision = record.decision or {}
        return JobDetail(
            card=self._card(record, started), exit_status=record.exit_status,
            grant=_text(decision.get("grant")), reasons=_reasons(record),
            resources=_resources(record), image=_text(record.spec.get("image")),
            log_length=_size(self._log_path(record)),
            may_cancel=self._agent.may_control(identity, record))

    def _card(self, record: JobRecord, started: float | None) -> JobCard:
        identity = _identity(record)
        return JobCard(
            id=record.id, name=_text(record.spec.get("name")) or record.id, state=record.state.value,
            # The same words the hub is told (`runner.job.waiting`).
            state_reason=waiting_reason(record),
            account=_text((record.decision or {}).get("account")), cluster=self._cluster,
            source=SourceLink(record.source, _source_label(record.source, identity),
                              _source_url(record, identity)),
            actor=identity.actor_principal if identity is not None else None,
            slurm_job_id=record.slurm_id, created=record.created_at,
            started=started,
            ended=record.finished_at)

    # -- the log -----------------------------------------------------------------------------------

    def _log_path(self, record: JobRecord) -> Path:
        return self._agent.driver.log_path(record)

    async def read_log(self, viewer: Viewer, job_id: str, offset: int, size: int) -> bytes:
        _, record = self._visible_record(viewer, job_id)
        path = self._log_path(record)
        size = max(0, min(size, MAX_READ_BYTES))
        env = record.spec.get("env")
        needles = secret_needles(secret_values(env, self._redacted_vars) if isinstance(env, dict) else [])
        data = await asyncio.to_thread(read_masked, functools.partial(_pread, path), offset, size, needles,
                                       final=record.state.is_terminal)
        available = _size(path)
        if len(data) < min(size, available - offset):
            self._held_at[job_id] = available
        else:
            self._held_at.pop(job_id, None)
        return data

    async def wait_for_log(self, job_id: str, offset: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        changed = self._job_change.setdefault(job_id, asyncio.Event())   # taken before looking
        record = self._agent.job(job_id)
        if record is None:
            return
        path = self._log_path(record)
        while _size(path) <= max(offset, self._held_at.get(job_id, 0)):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await pause(min(self._log_poll, remaining), changed)
            if changed.is_set():
                return

    async def wait_for_jobs(self, timeout: float) -> None:
        changed = self._any_change
        await pause(timeout, changed)

    def _changed(self, job_id: str) -> None:
        """Wake whoever waits for a change of this job, or of any job."""
        self._any_change.set()
        self._any_change = asyncio.Event()
        event = self._job_change.pop(job_id, None)
        if event is not None:
            event.set()

    # -- cancel ------------------------------------------------------------------------------------

    async def cancel(self, viewer: Viewer, job_id: str) -> JobDetail:
        identity, record = self._visible_record(viewer, job_id)
        if not self._agent.may_control(identity, record):
            raise NotCancellable(f"job {job_id} may be cancelled by its submitter and the admins of its "
                                 "account only")
        self._agent.cancel(identity, job_id)
        record = self._agent.job(job_id) or record
        return self._detail(identity, record)


    # -- replay ------------------------------------------------------------------------------------

    replays = True

    async def replay(self, viewer: Viewer, job_id: str) -> str:
        """A replay from the directory the job was submitted from, as `hpc-runner replay --workdir`
        would start it for the viewer: the same checks (image, commit, who owns the directory)."""
        identity, record = self._visible_record(viewer, job_id)
        if not self._agent.may_control(identity, record):
            raise NotCancellable(f"job {job_id} may be replayed by its submitter and the admins of its "
                                 "account only")
        submitted = (record.decision or {}).get("submitted_workspace")
        if not isinstance(submitted, str):
            raise NotReplayable(f"job {job_id} ran a checkout, not a submitted directory: replay it from a "
                                f"checkout of the same commit with `hpc-runner replay {job_id}`")
        uid = self._uid_of(identity)
        try:
            new, decision = await self._agent.replay(
                identity, job_id, Path(submitted),
                submitter_uid=None if uid in (self._agent_uid, 0) else uid)
        except (ReplayRefused, InputError) as exc:
            raise NotReplayable(str(exc)) from None
        if not decision.allowed:
            raise NotReplayable(f"the replay of job {job_id} ({new.id}) was denied: "
                                + "; ".join(decision.reasons))
        return new.id

    @staticmethod
    def _uid_of(identity: Identity) -> int | None:
        if identity.user is None:
            return None
        try:
            return pwd.getpwnam(identity.user).pw_uid
        except KeyError:
            return None

    # -- provenance and outputs --------------------------------------------------------------------

    async def provenance(self, viewer: Viewer, job_id: str) -> bytes | None:
        _, record = self._visible_record(viewer, job_id)
        return self._agent.store.provenance(record.id)

    def _recorded(self, record: JobRecord) -> tuple[RecordedOutput, ...]:
        data = self._agent.store.provenance(record.id)
        try:
            return () if data is None else parse_record(data)
        except OutputRefused:
            return ()

    def _outputs_dir(self, record: JobRecord) -> Path:
        return self._log_path(record).parent / OUTPUTS_DIR

    async def outputs(self, viewer: Viewer, job_id: str) -> tuple[OutputEntry, ...]:
        _, record = self._visible_record(viewer, job_id)
        directory = self._outputs_dir(record)
        entries = []
        for output in self._recorded(record):
            opened = await asyncio.to_thread(_open_output, directory, output)
            if opened is not None:
                opened.handle.close()
            entries.append(OutputEntry(output.path, output.sha256, output.size, opened is not None))
        return tuple(entries)

    async def open_output(self, viewer: Viewer, job_id: str, path: str) -> OpenedOutput | None:
        _, record = self._visible_record(viewer, job_id)
        output = find_output(self._recorded(record), path)
        if output is None:
            return None
        return await asyncio.to_thread(_open_output, self._outputs_dir(record), output)


def _open_output(directory: Path, output: RecordedOutput) -> OpenedOutput | None:
    """The collected file of `output` under the job's outputs directory, every step opened without
    following a link, if it is a regular file of the size the record gives (retention may have
    removed it)."""
    try:
        check_output_path(output.path)
        top = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (OutputRefused, OSError):
        return None
    try:
        fd = open_under(top, output.path)
    except OSError:
        return None
    finally:
        os.close(top)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size != output.size:
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return OpenedOutput(os.fdopen(fd, "rb"), output.size)


def _identity(record: JobRecord) -> Identity | None:
    try:
        return identity_from_json(record.identity)
    except InputError:
        return None


def _source_label(source: str, identity: Identity | None) -> str:
    """Where a job came from: its repository or pipeline, else its source ("local", "api")."""
    if identity is not None and source == "github" and identity.repository:
        return identity.repository
    if identity is not None and source == "buildkite" and identity.organization and identity.pipeline:
        return f"{identity.organization}/{identity.pipeline}"
    return source


def _source_url(record: JobRecord, identity: Identity | None) -> str | None:
    """The page the job came from, as the hub links to it (`source_link`)."""
    if identity is None:
        return record.source_url
    return source_link(record.source, identity, source_url=record.source_url)[1]


def _reasons(record: JobRecord) -> tuple[str, ...]:
    """Why a job ended as it did: every reason of a denial, else what the agent said of its end."""
    decision = record.decision or {}
    if record.state == JobState.denied and decision.get("allowed") is False:
        return tuple(str(reason) for reason in decision.get("reasons") or [] if reason)
    if record.state.is_terminal and record.state != JobState.succeeded and record.outcome_detail:
        return (record.outcome_detail,)
    return ()


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _whole(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _resources(record: JobRecord) -> Resources:
    """What the job asked for, as the decision settled it (the account's defaults filled in), else
    as its spec says; and the nodes it was given."""
    slurm = (record.decision or {}).get("slurm")
    if isinstance(slurm, dict):
        return Resources(nodes=_whole(slurm.get("nodes")), tasks=_whole(slurm.get("tasks")),
                         cpus_per_task=_whole(slurm.get("cpus_per_task")), gpus=_whole(slurm.get("gpus")),
                         memory=_text(slurm.get("memory")), time=_text(slurm.get("time")),
                         node_list=record.node_list)
    asked = record.spec.get("resources")
    asked = asked if isinstance(asked, dict) else {}
    memory, seconds = _whole(asked.get("memory_mb")), _whole(asked.get("time_seconds"))
    return Resources(nodes=_whole(asked.get("nodes")), tasks=_whole(asked.get("tasks")),
                     cpus_per_task=_whole(asked.get("cpus_per_task")), gpus=_whole(asked.get("gpus")),
                     memory=slurm_memory(memory) if memory is not None else None,
                     time=human_duration(seconds) if seconds is not None else None,
                     node_list=record.node_list)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _pread(path: Path, offset: int, size: int) -> bytes:
    if size == 0:
        return b""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return b""
    try:
        return os.pread(descriptor, size, offset)
    finally:
        os.close(descriptor)
