"""The agent as a process: its store, the local queue, the dashboard of its jobs (with
`web_socket`), the CI sources (the hub's API jobs among them), until it is drained.

`hpc-runner agent` and `hpc-runner demo` both run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from runner import exitcodes
from runner.agent import Agent
from runner.config import AgentConfig
from runner.localqueue.paths import socket_mode, web_socket_mode
from runner.localqueue.server import LocalQueueServer
from runner.localqueue.web import AgentWebServer
from runner.logging_setup import get_logger
from runner.metrics import MetricsServer
from runner.metrics import agent as agent_metrics
from runner.policy import Policy
from runner.sources.api.client import HubClient
from runner.sources.api.publish import HubPublisher, hub_pages, hub_public_url
from runner.sources.api.published import PublishedState
from runner.sources.api.source import serve_api
from runner.sources.buildkite.source import BuildkiteSource
from runner.sources.buildkite.state import BuildkiteState
from runner.sources.github.source import serve_github
from runner.store import Store

log = get_logger("runner.agent")


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard one, and return it. Every local-queue
    connection, job log and job process holds descriptors; the usual soft limit (1024) is a
    convention for select(), which the agent does not use, not what the system allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft
    # An unlimited hard limit still stops at the kernel's fs.nr_open.
    target = hard if hard != resource.RLIM_INFINITY else _kernel_open_file_limit()
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit", soft=soft, hard=hard, error=str(exc))
            return soft
    return max(target, soft)


def _kernel_open_file_limit() -> int:
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return 1024 * 1024


async def serve(config: AgentConfig, policy: Policy, reload: Callable[[], Policy],
                *, grace_seconds: float = 10.0, ready: Callable[[], None] | None = None,
                stop: asyncio.Event | None = None) -> int:
    """Serve the local queue until drained (SIGTERM, or `stop` set by an embedding caller)."""
    with Store.open(config.state_dir) as store, contextlib.ExitStack() as source_states:
        agent = Agent(config, policy, store, policy_loader=reload, grace_seconds=grace_seconds)
        server = LocalQueueServer(agent, config.socket_path(), mode=socket_mode(config))
        # Before the agent starts: the dashboard hears of every job's change from the first.
        dashboard = None if config.web_socket is None else AgentWebServer(
            agent, config.web_socket, mode=web_socket_mode(config),
            cluster=config.api.cluster if config.api is not None else None)
        github_config = config.github
        publisher: HubPublisher | None = None
        if config.api is not None:
            # Before any job is taken: with hub_url every job of every source reaches the hub.
            publisher = HubPublisher(HubClient.from_files(config.api.hub_url, config.api.hub_token_file),
                                     source_states.enter_context(PublishedState.open(config.state_dir)),
                                     cluster=config.api.cluster, job=agent.job,
                                     log_path=agent.driver.log_path, policy=lambda: agent.policy,
                                     cancel=agent.cancel_from_hub,
                                     redacted_vars=config.buildkite.redacted_vars if config.buildkite else ())
            publisher.attach(agent.admissions, agent.driver)
        metrics_server = None if config.metrics is None else MetricsServer(
            agent_metrics().registry, config.metrics.listen_host, config.metrics.listen_port)
        if metrics_server is not None:
            try:
                await metrics_server.start()
            except OSError as exc:
                print(f"hpc-runner: refusing to start: cannot listen on {metrics_server.host}:"
                      f"{metrics_server.port} ([metrics] listen): {exc.strerror or exc}", file=sys.stderr)
                return exitcodes.INVALID_INPUT
            log.info("metrics served", host=metrics_server.host, port=metrics_server.port)
        # Before the socket announces the agent: a SIGTERM from then on must drain, not kill it.
        agent.install_signal_handlers()
        try:
            await server.start()
        except BaseException:
            if metrics_server is not None:
                await metrics_server.close()
            raise
        if dashboard is not None:
            try:
                await dashboard.start()
            except BaseException:
                await dashboard.close()
                if metrics_server is not None:
                    await metrics_server.close()
                await server.close()
                raise
        agent.start()
        if publisher is not None and github_config is not None:
            github_config = hub_pages(github_config, await hub_public_url(publisher.client))
        sources: list[asyncio.Task[None]] = []
        if config.buildkite is not None:
            state = source_states.enter_context(BuildkiteState.open(config.state_dir))
            buildkite = BuildkiteSource(config.buildkite, agent, state, github=config.github)
            buildkite.load_trust()
            sources.append(asyncio.create_task(buildkite.serve()))
        if github_config is not None:
            github = serve_github(github_config, agent, state_dir=config.state_dir)
            sources.append(asyncio.create_task(github))
        if config.api is not None:
            api = serve_api(config.api, agent, state_dir=config.state_dir, issuers=config.oidc,
                            slots=config.max_jobs, github=config.github)
            sources.append(asyncio.create_task(api))
        if ready is not None:
            ready()
        if stop is not None:
            async def drain_on_stop() -> None:
                await stop.wait()
                agent.drain()
                agent.drain()  # an embedding caller's stop means: now, cancel what still runs
            stopper = asyncio.create_task(drain_on_stop())
        try:
            # CI sources end once drained: their jobs reported, their sessions disconnected.
            await asyncio.gather(*sources)
            await agent.finished.wait()
            if publisher is not None:
                # Every job's end reaches the hub before the agent stops, unless told to stop now.
                await _until(publisher.wait_idle(), agent.stopping)
        finally:
            for task in sources:
                task.cancel()
            await asyncio.gather(*sources, return_exceptions=True)
            if stop is not None:
                stopper.cancel()
            if dashboard is not None:
                await dashboard.close()
            if metrics_server is not None:
                await metrics_server.close()
            await server.close()
            await agent.stop_workers()
            if publisher is not None:
                await publisher.close()
                await publisher.client.close()
    log.info("agent stopped")
    return exitcodes.OK


async def _until(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    """`work` to its end, or until `stop` is set."""
    done = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({done, stopped}, return_when=asyncio.FIRST_COMPLETED)
    for task in (done, stopped):
        task.cancel()
    await asyncio.gather(done, stopped, return_exceptions=True)
