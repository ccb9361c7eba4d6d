"""The Prometheus metrics as a scraper reads them: the real agent (with the fake executor of
test_agent) and the real hub driven through jobs, `/metrics` fetched over HTTP and parsed with
prometheus_client's own parser. Plus the pieces with rules of their own: Slurm's commands as
counted, endpoint names that never hold an id, a policy's reasons as kinds, `[metrics]` in the
config, and the alert rules naming only metrics that exist."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runner import exitcodes, metrics
from runner.commands import hub as hub_command
from runner.config import HubConfig, MetricsConfig, parse_config_text
from runner.errors import InputError
from runner.executors.slurm.cli import SlurmCli, SlurmUnavailable
from runner.gateway import protocol
from runner.gateway.server import GatewayServer
from runner.gateway.tokens import load_agent_tokens
from runner.identity import Identity
from runner.job import JobState
from runner.lifecycle.metering import denial_kinds
from runner.lifecycle.prepare import job_dir
from unit import test_agent, test_hub_server
from unit.test_agent import ALICE, Harness
from unit.test_hub_server import TOKEN_A, Hub
from unit.test_slurm_cli import Scripted, error, ok

REPO = Path(__file__).resolve().parents[2]
# The agent of test_agent (real store, fake executor) and the hub of test_hub_server, as fixtures here.
harnesses = test_agent.harnesses
issuer = test_hub_server.issuer
start_hub = test_hub_server.start_hub
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(autouse=True)
def fresh_metrics() -> Iterator[None]:
    metrics.reset()
    yield
    metrics.reset()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def scrape(server: metrics.MetricsServer, http: aiohttp.ClientSession) -> Samples:
    async with http.get(f"http://127.0.0.1:{server.port}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == metrics.CONTENT_TYPE_LATEST
        text = await response.text()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
async def agent_endpoint() -> AsyncIterator[metrics.MetricsServer]:
    server = metrics.MetricsServer(metrics.agent().registry, "127.0.0.1", 0)
    await server.start()
    yield server
    await server.close()


# -- the agent ---------------------------------------------------------------------------------


async def test_a_job_moves_the_agents_counters_and_its_gauges_come_back_to_zero(
        harnesses: Callable[..., Harness], agent_endpoint: metrics.MetricsServer,
        http: aiohttp.ClientSession) -> None:
    h = harnesses()
    record = await h.submit(ALICE)
    await h.wait_started(record.id)
    (job_dir(h.config, record.id) / "output.log").write_bytes(b"hello from the job\n")  # 19 bytes
    during = await scrape(agent_endpoint, http)
    assert value(during, "hpc_runner_jobs_running", account="esm") == 1
    assert value(during, "hpc_runner_jobs_queued", account="esm") == 0
    assert value(during, "hpc_runner_jobs_started_total", source="local", account="esm") == 1
    assert value(during, "hpc_runner_job_queue_wait_seconds_count", source="local") == 1
    assert value(during, "hpc_runner_jobs_ended_total", source="local", account="esm",
                 state="succeeded") is None

    h.executor.release(record.id)
    await h.wait_state(record.id, JobState.succeeded)
    # The log's last bytes are handed over after the end is recorded: waited for, as a source would.
    forwarded = ("hpc_runner_log_bytes_forwarded_total", {"source": "local"})
    # The job's 19 bytes, then the lines that say what ran.
    size = (job_dir(h.config, record.id) / "output.log").stat().st_size
    assert size > 19
    await h.wait(lambda: metrics.agent().registry.get_sample_value(*forwarded) == size, "the log forwarded")
    after = await scrape(agent_endpoint, http)
    assert value(after, "hpc_runner_jobs_running", account="esm") == 0
    assert value(after, "hpc_runner_jobs_queued", account="esm") == 0
    assert value(after, "hpc_runner_jobs_ended_total", source="local", account="esm", state="succeeded") == 1
    assert value(after, "hpc_runner_job_run_seconds_count", source="local") == 1
    # The local queue's reader is the job's source: every byte of its log went there.
    assert value(after, "hpc_runner_log_bytes_forwarded_total", source="local") == size


async def test_a_waiting_job_counts_as_queued_and_a_cancelled_one_ends_cancelled(
        harnesses: Callable[..., Harness], agent_endpoint: metrics.MetricsServer,
        http: aiohttp.ClientSession) -> None:
    h = harnesses(max_jobs=1)
    first = await h.submit(ALICE)
    await h.wait_started(first.id)
    second = await h.submit(ALICE)
    samples = await scrape(agent_endpoint, http)
    assert (value(samples, "hpc_runner_jobs_running", account="esm"),
            value(samples, "hpc_runner_jobs_queued", account="esm")) == (1, 1)
    h.agent.cancel(ALICE, second.id)
    await h.wait_state(second.id, JobState.cancelled)
    h.executor.release(first.id)
    await h.wait_state(first.id, JobState.succeeded)
    samples = await scrape(agent_endpoint, http)
    assert value(samples, "hpc_runner_jobs_ended_total", source="local", account="esm",
                 state="cancelled") == 1
    assert value(samples, "hpc_runner_jobs_started_total", source="local", account="esm") == 1
    assert (value(samples, "hpc_runner_jobs_running", account="esm"),
            value(samples, "hpc_runner_jobs_queued", account="esm")) == (0, 0)


async def test_a_denial_is_counted_by_its_kind_and_ends_denied(
        harnesses: Callable[..., Harness], agent_endpoint: metrics.MetricsServer,
        http: aiohttp.ClientSession) -> None:
    h = harnesses()
    stranger = Identity(source="local", user="mallory", groups=("nobody",))
    record = await h.submit(stranger)
    assert record.state == JobState.denied
    samples = await scrape(agent_endpoint, http)
    assert value(samples, "hpc_runner_policy_denials_total", kind="no_grant") == 1
    assert value(samples, "hpc_runner_jobs_ended_total", source="local", account="none", state="denied") == 1
    assert value(samples, "hpc_runner_jobs_started_total", source="local", account="none") is None


def test_a_policys_reasons_become_kinds() -> None:
    assert denial_kinds(["no grant names this identity (it holds: local:user:x)"]) == {"no_grant"}
    assert denial_kinds([
        "grant 'esm-members': account esm already runs 3 jobs (max_concurrent_jobs = 3)",
        "grant 'esm-members': walltime 2h exceeds account esm's max_time = 1h",
        "grant 'ci': the job is unsigned; the grant requires a signature by one of (a)",
        "grant 'ci': image 'x' is not among the grant's images (julia)",
        "grant 'ci': something new"]) == {"concurrency", "resources", "signature", "image", "other"}


# -- Slurm's commands --------------------------------------------------------------------------


async def test_slurm_commands_are_counted_by_result_and_timed() -> None:
    cli = SlurmCli(Scripted(ok("42\n"), error("slurm_load_jobs error: Unable to contact slurm controller"),
                            TimeoutError()))
    assert await cli.sbatch("#!/bin/sh\n", ["--parsable"]) == "42"
    for _ in range(2):
        with pytest.raises(SlurmUnavailable):
            await cli.squeue(["1", "2"])
    registry = metrics.agent().registry
    assert registry.get_sample_value("hpc_runner_slurm_commands_total",
                                     {"command": "sbatch", "result": "ok"}) == 1
    assert registry.get_sample_value("hpc_runner_slurm_commands_total",
                                     {"command": "squeue", "result": "exit_nonzero"}) == 1
    assert registry.get_sample_value("hpc_runner_slurm_commands_total",
                                     {"command": "squeue", "result": "timeout"}) == 1
    assert registry.get_sample_value("hpc_runner_slurm_command_seconds_count", {"command": "squeue"}) == 2


def test_endpoint_names_hold_no_ids_owners_or_refs() -> None:
    assert metrics.endpoint_of("/repos/CliMA/Ocean/check-runs/12345") == "repos/check-runs"
    assert metrics.endpoint_of("/repos/o/r/commits/0a1b2c/check-runs?page=2") == "repos/commits/check-runs"
    assert metrics.endpoint_of("/repos/o/r/git/refs/heads/feature") == "repos/git/refs"
    assert metrics.endpoint_of("/app/installations/77/access_tokens") == "app/installations/access_tokens"
    assert metrics.endpoint_of("/api/v1/agent/jobs/abcdefghjkmnp/log") == "api/v1/agent/jobs/log"
    assert metrics.status_class(503) == "5xx" and metrics.status_class(None) == "error"


# -- the hub -----------------------------------------------------------------------------------


async def test_the_hub_counts_submissions_leases_log_bytes_and_requests_by_route(
        start_hub: Callable[..., object], http: aiohttp.ClientSession) -> None:
    hub = await start_hub()
    assert isinstance(hub, Hub)
    server = metrics.MetricsServer(metrics.hub().registry, "127.0.0.1", 0)
    await server.start()
    try:
        job_id = (await hub.submit(cluster="hpc1"))["id"]
        assert await hub.lease(TOKEN_A, cluster="hpc1") is not None
        assert (await hub.publish(job_id, "running"))[0] == 200
        assert (await hub.append(job_id, 0, b"0123456789"))[0] == 200
        assert (await hub.publish(job_id, "succeeded", exit_status=0))[0] == 200
        status, _, _ = await hub.call("GET", "/api/v1/jobs/nosuchjob00000", token=hub.token())
        assert status == 404
        samples = await scrape(server, http)
    finally:
        await server.close()
    assert value(samples, "hpc_runner_hub_jobs_submitted_total") == 1
    assert value(samples, "hpc_runner_hub_leases_total", kind="job") == 1
    assert value(samples, "hpc_runner_hub_log_bytes_received_total") == 10
    assert value(samples, "hpc_runner_hub_requests_total", route="/api/v1/jobs", method="POST",
                 status="2xx") == 1
    routes = {dict(labels)["route"] for name, labels in samples if name == "hpc_runner_hub_requests_total"}
    # Routes are the patterns: no job id reaches a label.
    assert not any(job_id in route or "nosuchjob" in route for route in routes)
    assert any(dict(labels).get("status") == "4xx" for name, labels in samples
               if name == "hpc_runner_hub_requests_total")


# -- the config and the deploy files -----------------------------------------------------------


def test_metrics_listen_is_read_and_checked() -> None:
    config = parse_config_text('state_dir = "/var/lib/x"\n[metrics]\nlisten = "127.0.0.1:9464"\n')
    assert config.metrics == MetricsConfig("127.0.0.1", 9464)
    assert parse_config_text('state_dir = "/var/lib/x"\n').metrics is None
    for bad in ('listen = "9464"', 'listen = "127.0.0.1:99999"', 'port = 9464'):
        with pytest.raises(InputError, match="metrics"):
            parse_config_text(f'state_dir = "/var/lib/x"\n[metrics]\n{bad}\n')


def known_metric_names() -> set[str]:
    names = set()
    for registry in (metrics.agent().registry, metrics.hub().registry):
        for family in registry.collect():
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
            suffixes = ("_total", "_created") if family.type == "counter" else \
                ("_bucket", "_count", "_sum", "_created") if family.type == "histogram" else ()
            names.update(family.name + suffix for suffix in suffixes)
    return names


def test_the_alert_rules_and_the_dashboard_name_only_metrics_that_exist() -> None:
    # promtool checks the rules' syntax (below); here, that each name they use exists.
    expressions = [(REPO / "deploy/prometheus/alerts.yml").read_text()]
    dashboard = json.loads((REPO / "deploy/grafana/hpc-runner.json").read_text())
    expressions += [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    named = {name for expr in expressions for name in re.findall(r"\bhpc_runner_[a-z_]+", expr)}
    assert named and named <= known_metric_names(), named - known_metric_names()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus) not installed")
def test_promtool_accepts_the_alert_rules() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(REPO / "deploy/prometheus/alerts.yml")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- `hpc-runner hub` with [metrics] -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def hub_config(tmp_path: Path) -> HubConfig:
    tokens = tmp_path / "agent-tokens"
    tokens.write_text(f"login-a:{TOKEN_A}\n")
    tokens.chmod(0o600)
    return HubConfig(listen_host="127.0.0.1", listen_port=0, webhook_secret_file=None,
                     agent_tokens_file=tokens, state_dir=tmp_path / "hub-state")


async def test_the_hub_serves_its_metrics_on_the_metrics_address(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    port = free_port()
    stop = asyncio.Event()
    scraped: list[str] = []

    def ready(server: GatewayServer) -> None:
        async def look() -> None:
            try:
                async with http.get(f"http://127.0.0.1:{server.port}{protocol.HEALTH_PATH}") as response:
                    assert response.status == 200
                async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                    scraped.append(await response.text())
            finally:
                stop.set()
        background.append(asyncio.create_task(look()))

    background: list[asyncio.Task[None]] = []
    config = hub_config(tmp_path)
    code = await hub_command.serve(config, None, load_agent_tokens(config.agent_tokens_file), ready=ready,
                                   stop=stop, metrics=MetricsConfig("127.0.0.1", port))
    await asyncio.gather(*background)
    assert code == 0
    (text,) = scraped
    samples = {sample.name: sample.labels for family in text_string_to_metric_families(text)
               for sample in family.samples}
    assert samples["hpc_runner_hub_requests_total"] == {"route": protocol.HEALTH_PATH, "method": "GET",
                                                         "status": "2xx"}


async def test_the_hub_refuses_to_start_when_its_metrics_address_is_taken(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = hub_config(tmp_path)
        code = await hub_command.serve(config, None, load_agent_tokens(config.agent_tokens_file),
                                       metrics=MetricsConfig("127.0.0.1", port))
    assert code == exitcodes.INVALID_INPUT
    assert f"cannot listen on 127.0.0.1:{port} ([metrics] listen)" in capsys.readouterr().err
