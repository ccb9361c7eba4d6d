"""Every Prometheus metric of the agent and of the hub, and the `/metrics` endpoint that serves them.

One prefix (`hpc_runner_`), counters end in `_total`, durations are `_seconds`. Each process
has registries of its own (never prometheus_client's global one): `agent()` and `hub()` hand out
the process's current set, and `reset()` starts fresh ones (tests). The code that counts calls
the small functions here; what a job's changes of state mean is `runner.lifecycle.metering`'s.

Label values are bounded: sources and Slurm commands are fixed names, accounts come from the
policy, endpoints and routes are names or patterns (never a path with ids in it), and status is a
class ("2xx", "4xx", "error"), never the code.

The endpoint has no authentication: bind it to loopback or a management network.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "hpc_runner_"
METRICS_PATH = "/metrics"

# Jobs wait from seconds (a free slot) to a day (a busy cluster); they run about as long.
JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
               14400.0, 43200.0, 86400.0)
# Slurm's commands answer in milliseconds, or in seconds when slurmctld is busy.
SLURM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# A job's account when its decision names none (denied before a grant was found).
NO_ACCOUNT = "none"

# (account -> jobs) for the jobs waiting (queued or pending) and running, read when scraped.
JobCounts = Callable[[], tuple[dict[str, int], dict[str, int]]]


class _JobGauges(Collector):
    """`jobs_queued` and `jobs_running` per account, counted from the agent's store at each scrape:
    right after a restart as much as after a day. An account seen once stays, at 0."""

    def __init__(self) -> None:
        self.counts: JobCounts | None = None
        self._seen: set[str] = set()

    def collect(self) -> Iterator[Metric]:
        queued, running = self.counts() if self.counts is not None else ({}, {})
        self._seen.update(queued, running)
        for name, counts, what in (("jobs_queued", queued, "Jobs admitted and waiting: for a slot of "
                                                             "the agent, or pending in Slurm"),
                                   ("jobs_running", running, "Jobs running")):
            family = GaugeMetricFamily(PREFIX + name, what, labels=["account"])
            for account in sorted(self._seen):
                family.add_metric([account], counts.get(account, 0))
            yield family

    def describe(self) -> Iterable[Metric]:
        return ()


@dataclass
class AgentMetrics:
    """The agent's metrics, on a registry of their own."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        r = self.registry
        self.jobs_started = Counter(PREFIX + "jobs_started", "Jobs that started running (again, after a "
                                    "node failure)", ["source", "account"], registry=r)
        self.jobs_ended = Counter(PREFIX + "jobs_ended", "Jobs that ended, by final state",
                                  ["source", "account", "state"], registry=r)
        self.job_queue_wait = Histogram(PREFIX + "job_queue_wait_seconds", "From admission to running",
                                        ["source"], buckets=JOB_BUCKETS, registry=r)
        self.job_run = Histogram(PREFIX + "job_run_seconds", "From running to the end", ["source"],
                                 buckets=JOB_BUCKETS, registry=r)
        self.log_bytes_forwarded = Counter(PREFIX + "log_bytes_forwarded", "Log bytes handed to a job's "
                                           "source (its CI service, the local queue's reader)", ["source"],
                                           registry=r)
        self.ci_requests = Counter(PREFIX + "ci_requests", "Requests to the CI services and the hub, by "
                                   "answer class (error: no answer)", ["source", "endpoint", "status"],
                                   registry=r)
        self.slurm_commands = Counter(PREFIX + "slurm_commands", "Slurm commands run, by result (ok, "
                                      "exit_nonzero, timeout, not_run)", ["command", "result"], registry=r)
        self.slurm_command_seconds = Histogram(PREFIX + "slurm_command_seconds", "How long Slurm's commands "
                                               "took", ["command"], buckets=SLURM_BUCKETS, registry=r)
        self.policy_denials = Counter(PREFIX + "policy_denials", "Jobs the policy denied at admission, by "
                                      "kind of reason (a job denied for several counts once for each)",
                                      ["kind"], registry=r)
        self.signature_rejections = Counter(PREFIX + "signature_rejections", "Buildkite jobs refused for "
                                            "their step signature (missing, invalid, not matching)",
                                            registry=r)
        self.reattachments = Counter(PREFIX + "reattachments", "Slurm jobs of a previous agent found again "
                                     "at start: still there (followed again) or ended meanwhile",
                                     ["found"], registry=r)
        self.job_gauges = _JobGauges()
        r.register(self.job_gauges)


@dataclass
class HubMetrics:
    """The hub's metrics, on a registry of their own."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        r = self.registry
        self.jobs_submitted = Counter(PREFIX + "hub_jobs_submitted", "Jobs submitted to the jobs API",
                                      registry=r)
        self.leases = Counter(PREFIX + "hub_leases", "Leases given to agents: API jobs (job) and GitHub "
                              "webhook deliveries (webhook)", ["kind"], registry=r)
        self.log_bytes_received = Counter(PREFIX + "hub_log_bytes_received", "Log bytes agents appended to "
                                          "their jobs' logs", registry=r)
        self.hook_deliveries = Counter(PREFIX + "hub_hook_deliveries", "Outbound hook deliveries tried, by "
                                       "result (delivered, retrying, given_up)", ["result"], registry=r)
        self.requests = Counter(PREFIX + "hub_requests", "HTTP requests the hub answered, by route pattern "
                                "and status class", ["route", "method", "status"], registry=r)


_agent = AgentMetrics()
_hub = HubMetrics()


def agent() -> AgentMetrics:
    return _agent


def hub() -> HubMetrics:
    return _hub


def reset() -> tuple[AgentMetrics, HubMetrics]:
    """Fresh registries for this process (tests), returned."""
    global _agent, _hub
    _agent, _hub = AgentMetrics(), HubMetrics()
    return _agent, _hub


# -- what the code calls ---------------------------------------------------------------------------


def status_class(status: int | None) -> str:
    """"2xx"...; "error" when no answer came (a connection error, a timeout)."""
    return "error" if status is None else f"{status // 100}xx"


def ci_request(source: str, endpoint: str, status: int | None) -> None:
    _agent.ci_requests.labels(source, endpoint, status_class(status)).inc()


def ci_call(source: str, method: str, path: str, status: int | None) -> None:
    """A request to `path` of a CI service or the hub, its endpoint named by `endpoint_of`."""
    ci_request(source, f"{method} {endpoint_of(path)}", status)


def slurm_command(command: str, result: str, seconds: float) -> None:
    _agent.slurm_commands.labels(command, result).inc()
    _agent.slurm_command_seconds.labels(command).observe(seconds)


def signature_rejected() -> None:
    _agent.signature_rejections.inc()


def reattached(found: str, count: int = 1) -> None:
    if count:
        _agent.reattachments.labels(found).inc(count)


def log_bytes_forwarded(source: str, count: int) -> None:
    if count:
        _agent.log_bytes_forwarded.labels(source).inc(count)


def hub_job_submitted() -> None:
    _hub.jobs_submitted.inc()


def hub_leased(kind: str) -> None:
    _hub.leases.labels(kind).inc()


def hub_log_received(count: int) -> None:
    _hub.log_bytes_received.inc(count)


def hub_hook_delivery(result: str) -> None:
    _hub.hook_deliveries.labels(result).inc()


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@web.middleware
async def count_hub_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Each request the hub answers, by its route's pattern (never the path: it holds ids)."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    method = request.method if request.method in _METHODS else "other"
    status: int | None = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except BaseException:
        # A request the client hung up on (cancelled) was answered by nobody.
        status = None
        raise
    finally:
        _hub.requests.labels(route, method, status_class(status)).inc()


_ID_AFTER = frozenset({"jobs", "leases"})
_WORD = re.compile(r"[a-z][a-z_-]{0,39}")
# GitHub's sub-resources kept in an endpoint's name; anything else below a resource is an id or a ref.
_GITHUB_WORDS = frozenset({"comments", "commits", "check-runs", "check-suites", "files", "reviews",
                           "statuses", "status", "reactions", "labels", "rerequest", "annotations",
                           "pulls", "issues", "access_tokens", "installation", "installations",
                           "collaborators", "permission", "members", "teams", "memberships", "compare",
                           "git", "ref", "refs", "runs"})


def endpoint_of(path: str) -> str:
    """A request path as a name of few values: ids, owners, repositories and refs are left out.

    `/repos/o/r/check-runs/12` is `repos/check-runs`, `/api/v1/agent/jobs/0ab3/log` is
    `api/v1/agent/jobs/log`, `/app/installations/7/access_tokens` is `app/installations/access_tokens`.
    """
    parts = [part for part in path.split("?", 1)[0].split("/") if part]
    if parts[:1] == ["repos"]:
        rest = parts[3:]
        kept = ["repos", *rest[:1], *(part for part in rest[1:] if part in _GITHUB_WORDS)]
        if "ref" in kept or "refs" in kept:  # a ref's name follows; it is not kept
            kept = kept[:max(kept.index(word) for word in ("ref", "refs") if word in kept) + 1]
        return "/".join(kept[:6]) or "/"
    # The segment after a collection of the hub's is an id, whatever it looks like.
    kept = [part for index, part in enumerate(parts)
            if (_WORD.fullmatch(part) or re.fullmatch(r"v\d{1,2}", part))
            and not (index and parts[index - 1] in _ID_AFTER)]
    return "/".join(kept[:6]) or "/"


# -- the endpoint ----------------------------------------------------------------------------------


def metrics_app(registry: CollectorRegistry) -> web.Application:
    """`GET /metrics`: the registry in Prometheus' text format."""
    async def scrape(request: web.Request) -> web.Response:
        # On the event loop's thread: the agent's job gauges read its store, which lives there.
        body = generate_latest(registry)
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get(METRICS_PATH, scrape)
    return app


class MetricsServer:
    """The `/metrics` endpoint on its own address (`[metrics] listen`)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._app = metrics_app(registry)
        self.host, self.port = host, port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen; raises OSError (the port is taken, the address is not this host's)."""
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        address = self._runner.addresses[0]
        self.port = int(address[1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
