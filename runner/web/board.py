"""What the dashboard shows of jobs, and what it asks of whoever holds them (pure; no I/O).

The pages are served by the hub (its job store: every cluster's jobs) and by an agent on its own
Unix socket (its store: this agent's jobs). Both answer the same questions through `JobBoard`, in
the same shapes: a `JobCard` per row of the list, a `JobDetail` for a job's page. Which jobs a
viewer may see is the holder's to decide (by the viewer's principals, as the API decides); the
pages never see a job they may not show.

Times are epoch seconds; a page renders them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from runner.job import JOB_ID_PATTERN, JobState

# The states a list can be filtered by, in the order the filter offers them.
STATES = tuple(state.value for state in JobState)
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
MAX_TEXT_FILTER_CHARS = 200


@dataclass(frozen=True)
class Viewer:
    """Who looks: a person logged in at the site's IdP (`idp:user:U`, `idp:group:G`), or the local
    user connected to an agent's socket (`local:user:U`, `local:group:G`)."""

    name: str                       # what the page header says
    principals: tuple[str, ...]


@dataclass(frozen=True)
class SourceLink:
    """Where a job came from, with a link back when there is one: the pull request and check run,
    the Buildkite job, the API caller."""

    kind: str                       # "github", "buildkite", "api", "local"
    label: str                      # "octo-org/octo-repo#12", "clima/atmos #4711", "api", "local"
    url: str | None = None


@dataclass(frozen=True)
class JobCard:
    """One row of the jobs list."""

    id: str
    name: str
    state: str
    state_reason: str | None        # why it waits, while queued or pending (Slurm's reason)
    account: str | None
    cluster: str | None
    source: SourceLink
    actor: str | None               # who set it off: a principal (github:user:octocat)
    slurm_job_id: str | None
    created: float
    started: float | None
    ended: float | None

    @property
    def queue_wait(self) -> float | None:
        """Seconds from its submission to its start (None before it started)."""
        return None if self.started is None else max(0.0, self.started - self.created)

    @property
    def duration(self) -> float | None:
        """Seconds it ran (until now for a running job: None; the page counts on)."""
        if self.started is None or self.ended is None:
            return None
        return max(0.0, self.ended - self.started)


@dataclass(frozen=True)
class Resources:
    nodes: int | None = None
    tasks: int | None = None
    cpus_per_task: int | None = None
    gpus: int | None = None
    memory: str | None = None
    time: str | None = None
    node_list: str | None = None    # where it ran, as Slurm names the nodes


@dataclass(frozen=True)
class JobDetail:
    """A job's page: its card, the decision, its resources, and how much log there is."""

    card: JobCard
    exit_status: int | None
    grant: str | None
    reasons: tuple[str, ...]        # every reason of a denial, or why it failed
    resources: Resources
    image: str | None
    log_length: int
    may_cancel: bool                # the viewer may cancel it (its submitter, its account's admins)

    @property
    def ended(self) -> bool:
        return self.card.ended is not None or self.card.state in _TERMINAL


_TERMINAL = frozenset(state.value for state in JobState if state.is_terminal)


@dataclass(frozen=True)
class ListQuery:
    """A page of the list: filters, and where the page starts (`before`: the last id of the previous
    page, newest first)."""

    states: tuple[str, ...] = ()
    account: str | None = None
    source: str | None = None
    text: str | None = None         # in the name, id, actor, repository or pipeline
    before: str | None = None
    limit: int = DEFAULT_PAGE_SIZE


@dataclass(frozen=True)
class Page:
    cards: Sequence[JobCard]
    next_before: str | None         # the `before` of the next (older) page; None on the last
    accounts: Sequence[str] = field(default_factory=tuple)   # what the account filter offers


@dataclass(frozen=True)
class OutputEntry:
    """One output a job's provenance record names, and whether its holder can give out the file."""

    path: str
    sha256: str
    size: int
    available: bool


@dataclass
class OpenedOutput:
    """An output file opened for reading (never through a link); the reader closes it."""

    handle: BinaryIO
    size: int


class NotVisible(Exception):
    """No such job for this viewer (answered 404, whether it exists or not)."""


class NotCancellable(Exception):
    """The viewer may see the job but not cancel it."""


class NotReplayable(Exception):
    """The job cannot be replayed from here; the message says why and what to run instead."""


class JobBoard(Protocol):
    """The jobs a dashboard shows, as their holder (the hub, an agent) decides for each viewer."""

    async def page(self, viewer: Viewer, query: ListQuery) -> Page: ...

    async def detail(self, viewer: Viewer, job_id: str) -> JobDetail:
        """NotVisible when the viewer may not see it."""
        ...

    async def read_log(self, viewer: Viewer, job_id: str, offset: int, size: int) -> bytes:
        """Up to `size` bytes of the log from `offset`, exactly as the job wrote them."""
        ...

    async def wait_for_log(self, job_id: str, offset: int, timeout: float) -> None:
        """Until the log is longer than `offset`, the job changed state, or `timeout` passed."""
        ...

    async def wait_for_jobs(self, timeout: float) -> None:
        """Until any job the board holds changed, or `timeout` passed."""
        ...

    async def cancel(self, viewer: Viewer, job_id: str) -> JobDetail:
        """NotVisible, NotCancellable, or the job with its cancel asked for."""
        ...

    # Whether the holder can start a replay itself (an agent can; the hub only shows the command).
    replays: bool

    async def replay(self, viewer: Viewer, job_id: str) -> str:
        """The id of a new job replaying this one as the viewer; NotVisible, NotCancellable (those
        who may cancel a job may replay it), NotReplayable."""
        ...

    async def provenance(self, viewer: Viewer, job_id: str) -> bytes | None:
        """The job's provenance record, byte for byte (None before it has one); NotVisible."""
        ...

    async def outputs(self, viewer: Viewer, job_id: str) -> tuple[OutputEntry, ...]:
        """The outputs its record names (none before it has one); NotVisible."""
        ...

    async def open_output(self, viewer: Viewer, job_id: str, path: str) -> OpenedOutput | None:
        """The file of an output its record names, if the holder has it; NotVisible."""
        ...


def parse_list_query(params: dict[str, list[str]] | dict[str, str]) -> ListQuery:
    """A list query from a page's query string; ValueError naming the bad parameter."""
    def values(name: str) -> list[str]:
        raw = params.get(name, [])
        return [raw] if isinstance(raw, str) else list(raw)

    def single(name: str, limit: int = 200) -> str | None:
        found = [value.strip() for value in values(name) if value.strip()]
        if not found:
            return None
        if len(found[0]) > limit:
            raise ValueError(f"{name}: at most {limit} characters")
        return found[0]

    states = tuple(dict.fromkeys(value for value in values("state") if value))
    unknown = [state for state in states if state not in STATES]
    if unknown:
        raise ValueError(f"state: {unknown[0]!r} is not one of {', '.join(STATES)}")
    before = single("before")
    if before is not None and not JOB_ID_PATTERN.fullmatch(before):
        raise ValueError("before: not a job id")
    limit_text = single("limit") or str(DEFAULT_PAGE_SIZE)
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_PAGE_SIZE:
        raise ValueError(f"limit: a whole number from 1 to {MAX_PAGE_SIZE}")
    return ListQuery(states=states, account=single("account"), source=single("source"),
                     text=single("q", MAX_TEXT_FILTER_CHARS), before=before, limit=int(limit_text))
