"""The agent as a process: its store, the local queue, the CI sources (the hub's API jobs among
them), until it is drained.

`hpc-runner agent` and `hpc-runner demo` both run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import Callable
from pathlib import Path

from runner import exitcodes
from runner.agent import Agent
from runner.config import AgentConfig
from runner.localqueue.paths import socket_mode
from runner.localqueue.server import LocalQueueServer
from runner.logging_setup import get_logger
from runner.policy import Policy
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
        # Before the socket announces the agent: a SIGTERM from then on must drain, not kill it.
        agent.install_signal_handlers()
        await server.start()
        agent.start()
        sources: list[asyncio.Task[None]] = []
        if config.buildkite is not None:
            state = source_states.enter_context(BuildkiteState.open(config.state_dir))
            buildkite = BuildkiteSource(config.buildkite, agent, state, github=config.github)
            buildkite.load_trust()
            sources.append(asyncio.create_task(buildkite.serve()))
        if config.github is not None:
            github = serve_github(config.github, agent, state_dir=config.state_dir)
            sources.append(asyncio.create_task(github))
        if config.api is not None:
            api = serve_api(config.api, agent, state_dir=config.state_dir, issuers=config.oidc,
                            slots=config.max_jobs)
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
        finally:
            for task in sources:
                task.cancel()
            await asyncio.gather(*sources, return_exceptions=True)
            if stop is not None:
                stopper.cancel()
            await server.close()
            await agent.stop_workers()
    log.info("agent stopped")
    return exitcodes.OK
