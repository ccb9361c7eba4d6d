"""The GitHub source: triggers in, confirmed through the API, run on the cluster, reported as check runs.

In poll mode (the default) the agent polls its repositories itself (`poller`); in gateway mode it
long-polls the webhook gateway for deliveries, keeps each delivery leased while its jobs run and
acknowledges it once they are reported. Either way a trigger goes the same path:

1. `confirm` reads through the API, with the app's own credentials, what the trigger claims, and
   `translate.assess` decides: run (as which identity, at which SHA), ask for approval (a check run
   `action_required` saying why), or ignore;
2. the trigger is recorded under its key (`state`): a key is acted on once, across restarts and,
   in gateway mode, across agents (an agent handed a delivery whose lease another agent lost looks
   for that trigger's check runs first and leaves a job that already has one alone);
3. the jobs come from `.hpc-runner.toml` at the confirmed SHA (contents API); a broken file is a
   failed `hpc-runner` check run quoting the error;
4. each job is admitted by the agent (`JobHost.admit`: the policy decides), gets its check run
   (queued, with the decision), is checked out on this node (the installation token used for the
   fetch only), runs through `JobHost.run` while its log tail goes to the check run at most every
   10 s, and ends with one final update. A run's progress is stored, so a restarted agent follows
   the Slurm job again (`JobHost.resume`) and reports it exactly once.

Cancelling: the check run's Cancel button (gateway mode: a `check_run` `requested_action`
delivery) or a `/hpc-runner cancel` comment on the pull request (both modes), by someone with write
permission, cancels the pull request's running jobs (scancel).

This module wires the parts together: `intake` (triggers in, steps 1 and 2, approvals, cancel
requests), `runs` (a trigger's jobs, steps 3 and 4), `report` (what GitHub is told about a job) and
a `TaskSet` (the work in flight). They share the agent's `JobHost`, the REST client and the
`GithubState`, handed to each of them here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from runner.config import GithubConfig
from runner.logging_setup import get_logger
from runner.sources import JobHost
from runner.sources.github import checks, translate
from runner.sources.github.appauth import AppAuth, load_private_key
from runner.sources.github.checkout import checkout
from runner.sources.github.client import GitHubClient
from runner.sources.github.confirm import Confirmer
from runner.sources.github.gateway_client import Delivery, GatewayClient
from runner.sources.github.intake import Intake
from runner.sources.github.poller import Poller
from runner.sources.github.report import Reports
from runner.sources.github.runs import Runs
from runner.sources.github.state import GithubState
from runner.sources.github.translate import CancelRequest, Trigger
from runner.tasks import TaskSet

log = get_logger("runner.sources.github")

RETRY_SECONDS = 60.0


class GithubSource:
    """Serves `[github]` for the agent `host` until it drains (see the module docstring)."""

    def __init__(self, config: GithubConfig, host: JobHost, *, client: GitHubClient, auth: AppAuth,
                 state: GithubState, gateway: GatewayClient | None = None,
                 update_interval: float = checks.UPDATE_INTERVAL, redacted_vars: tuple[str, ...] = (),
                 checkout_fn: Callable[..., Awaitable[str]] = checkout,
                 retry_seconds: float = RETRY_SECONDS) -> None:
        if config.mode == "gateway" and gateway is None:
            raise ValueError('mode = "gateway" needs a gateway client')
        self.config = config
        self.host = host
        self.client = client
        self.auth = auth
        self.state = state
        self.gateway = gateway
        self.update_interval = update_interval
        self.retry_seconds = retry_seconds
        self.confirmer = Confirmer(client, config)
        self.poller = Poller(client, state, config)
        self.reports = Reports(client)
        self.forbidden = self.reports.forbidden     # repositories where checks are not allowed
        self.background = TaskSet()
        self.runs = Runs(config, host, client=client, auth=auth, state=state, reports=self.reports,
                         background=self.background, update_interval=update_interval,
                         retry_seconds=retry_seconds, redacted_vars=redacted_vars, checkout_fn=checkout_fn)
        self.intake = Intake(config, host, client=client, state=state, confirmer=self.confirmer,
                             poller=self.poller, gateway=gateway, runs=self.runs, reports=self.reports,
                             background=self.background)
        self.stopped = asyncio.Event()

    async def serve(self) -> None:
        wildcards = translate.wildcard_teams(self.host.policy)
        if wildcards:
            log.warning("the policy names every team of an organisation; GitHub identities only hold "
                        "the teams the policy names one by one", principals=list(wildcards))
        try:
            self.runs.resume_all()
            if self.config.mode == "gateway":
                await self.intake.serve_gateway()
            else:
                await self.intake.serve_polling()
            await self.background.wait_idle()
        finally:
            # Cancelled (the agent stops at once): what runs is left as it is, for the next start
            # to follow again; nothing is reported as ended that did not end.
            await self.background.cancel_all()
            self.stopped.set()
            log.info("GitHub source stopped")

    async def wait_idle(self) -> None:
        """Until every trigger taken so far has its jobs reported (tests and benchmarks use this)."""
        await self.background.wait_idle()

    async def poll_once(self, repository: str) -> None:
        """One poll round for one repository (`Intake.poll_once`)."""
        await self.intake.poll_once(repository)

    async def serve_delivery(self, delivery: Delivery) -> None:
        """Act on one gateway delivery (`Intake.serve_delivery`)."""
        await self.intake.serve_delivery(delivery)

    async def take(self, trigger: Trigger, *, recheck_github: bool = False) -> asyncio.Task[None] | None:
        """Confirm, record and start a trigger (`Intake.take`)."""
        return await self.intake.take(trigger, recheck_github=recheck_github)

    async def cancel(self, request: CancelRequest) -> None:
        """Cancel the jobs a request names, if its author may (`Intake.cancel`)."""
        await self.intake.cancel(request)


# ---------------------------------------------------------------------------- the agent's entry points


def check_github(config: GithubConfig) -> None:
    """Read the `[github]` secrets now, so a bad file stops the agent before it takes a job."""
    load_private_key(config.private_key_file)
    if config.mode == "gateway":
        GatewayClient.from_config(config)


async def serve_github(config: GithubConfig, host: JobHost, *, state_dir: Path) -> None:
    """`[github]` of `hpc-runner agent`: the source with its REST client, its state and, in gateway
    mode, its gateway client, until the host drains."""
    auth = AppAuth(config.app_id, load_private_key(config.private_key_file))
    gateway = GatewayClient.from_config(config) if config.mode == "gateway" else None
    try:
        async with aiohttp.ClientSession() as session:
            client = GitHubClient(session, api_url=config.api_url, auth=auth)
            with GithubState.open(state_dir) as state:
                source = GithubSource(config, host, client=client, auth=auth, state=state, gateway=gateway)
                await source.serve()
    finally:
        if gateway is not None:
            await gateway.close()
