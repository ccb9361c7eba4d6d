"""The API source: jobs submitted to the hub's REST API with an OIDC token, leased by this agent
for its cluster, run here, and published back to the hub.

Each job goes one way, every step recorded (`state`) before the next, so a restarted agent
carries on from where the job was and the hub hears its end once:

1. leased (`intake`); a job whose cancel was asked for already ends cancelled;
2. confirmed: the token verified by this agent itself, as of when the hub received it, within
   `hub_max_queue_age`, and bound to this job if its audience says so (`confirm`); the job object
   read as a job spec, with the token's identity, repository and commit (`translate`) and where
   the repository is fetched from (`checkout`). A job refused here never reaches the agent: the
   hub gets `denied` with the reason as its state and its log;
3. taken: its first state (`queued`) published, which makes the job this agent's for good (a
   lease that ran out meanwhile, and went to another agent, is left to that agent);
4. admitted by the agent (`JobHost.admit`: the policy decides, as for any source); a denial is
   published with every reason;
5. checked out into the job's own directory (or an empty workspace), then run through
   `JobHost.run` while each change of its state and its log go to the hub (`report`), and a
   cancel asked for at the hub cancels it (scancel under Slurm);
6. its final state published after its whole log.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from runner.config import FILE_DESCRIPTIONS, ApiConfig, GithubConfig
from runner.gateway.jobs_protocol import JobLease
from runner.identity import Identity, identity_from_json
from runner.job import JobState
from runner.logging_setup import get_logger
from runner.oidc.errors import KeysUnavailable
from runner.oidc.issuers import OidcIssuer
from runner.oidc.verify import TokenVerifier
from runner.secrets import read_secret_file
from runner.sources import Admission, Ended, JobHost
from runner.sources.api.checkout import (
    AppCheckoutTokens,
    CheckoutFailed,
    NoAppToken,
    check_out,
    clone_url,
    empty_workspace,
)
from runner.sources.api.client import HubClient, HubRefused
from runner.sources.api.confirm import confirm
from runner.sources.api.intake import Intake
from runner.sources.api.report import CANCEL_POLL_SECONDS, HubReport, end_unrun, job_secrets
from runner.sources.api.state import ApiJob, ApiState, Phase
from runner.sources.api.translate import SOURCE, job_spec, translate
from runner.sources.checkout_failure import end_failed_checkout
from runner.sources.github.appauth import AppAuth, load_private_key
from runner.sources.github.client import GitHubClient
from runner.sources.refusal import Refusal
from runner.tasks import TaskSet

log = get_logger("runner.sources.api")

CANCELLED_WAITING = "cancelled through the API before it started"

CheckOut = Callable[..., Awaitable[str]]


def preamble(job: ApiJob, identity: Identity) -> str:
    """The lines that open the job's log."""
    source = (f"repository {job.repository} at commit {job.commit}" if job.repository is not None
              else "no repository (an empty workspace)")
    return (f"hpc-runner: API job {job.hub_id} of the hub, submitted as {identity.actor_principal}; "
            f"its token (issuer {job.issuer}) verified by this agent\n"
            f"hpc-runner: {source}\n")


class ApiSource:
    """Serves the hub's API jobs for `config.cluster` to the agent `host` until it drains."""

    def __init__(self, config: ApiConfig, host: JobHost, *, client: HubClient, state: ApiState,
                 verifier: TokenVerifier, slots: int, clock: Callable[[], float] = time.time,
                 cancel_interval: float = CANCEL_POLL_SECONDS, checkout_fn: CheckOut = check_out,
                 tokens: AppCheckoutTokens | None = None) -> None:
        self.config = config
        self.host = host
        self.client = client
        self.state = state
        self.verifier = verifier
        self._clock = clock
        self.cancel_interval = cancel_interval
        self._checkout = checkout_fn
        self.tokens = tokens
        self.background = TaskSet()
        self._following: set[str] = set()     # hub ids of the jobs being taken to their end
        self.intake = Intake(client, cluster=config.cluster, draining=host.draining,
                             background=self.background, slots=slots)
        self.stopped = asyncio.Event()

    async def serve(self) -> None:
        try:
            for job in self.state.open_jobs():
                log.info("carrying on with an API job after a restart", job=job.hub_id, phase=job.phase)
                self.background.spawn(self._follow(job))
            await self.intake.serve(self._take_leased)
            await self.background.wait_idle()
        finally:
            # Cancelled (the agent stops at once): what runs is left as it is, for the next start.
            await self.background.cancel_all()
            self.stopped.set()
            log.info("API source stopped")

    async def wait_idle(self) -> None:
        """Until every job taken so far has its final state at the hub (tests use this)."""
        await self.background.wait_idle()

    # ---------------------------------------------------------------------------- a new lease

    async def _take_leased(self, lease: JobLease) -> None:
        try:
            await self.take(lease)
        except Exception:
            log.exception("an API job could not be taken; its lease runs out and it is leased again",
                          job=lease.id)

    async def take(self, lease: JobLease) -> None:
        """Confirm a leased job and take it to its final state at the hub (steps 1 to 6)."""
        known = self.state.job(lease.id)
        if known is not None:
            # Confirmed before a restart, and leased again before its first state reached the hub:
            # it carries on from where it was (unless it is being followed already).
            if not self.state.done(lease.id):
                await self._follow(known)
            return
        if lease.cancel_requested:
            await end_unrun(self.client, lease.id, state=JobState.cancelled.value, reason=CANCELLED_WAITING,
                            line=f"hpc-runner: {CANCELLED_WAITING}\n")
            return
        try:
            job = await self._confirm(lease)
        except Refusal as refusal:
            log.warning("API job refused", job=lease.id, reason=refusal.reason)
            await end_unrun(self.client, lease.id, state=JobState.denied.value, reason=refusal.reason,
                            line=f"hpc-runner: refused: {refusal.reason}\n")
            return
        except KeysUnavailable as exc:
            # No judgement either way: the lease runs out, and the job is leased (and judged) again.
            log.warning("the token's issuer keys are out of reach; the job goes back to the hub when its "
                        "lease runs out", job=lease.id, error=str(exc))
            return
        self.state.save(job)
        await self._follow(job)

    async def _confirm(self, lease: JobLease) -> ApiJob:
        verified = await confirm(lease, self.verifier, now=self._clock(),
                                 max_queue_age=self.config.max_queue_age)
        translated = translate(lease, verified.identity, cluster=self.config.cluster)
        repository = translated.repository
        url = None if repository is None else clone_url(self.config.checkout_url, repository)
        log.info("API job confirmed", job=lease.id, issuer=verified.issuer_name,
                 actor=verified.identity.actor_principal, repository=repository, commit=translated.commit)
        return ApiJob(hub_id=lease.id, job=lease.job, identity=verified.identity.to_json(),
                      issuer=verified.issuer_name, repository=repository, commit=translated.commit,
                      clone_url=url, ref=verified.identity.ref)

    # ---------------------------------------------------------------------------- one job

    async def _follow(self, job: ApiJob) -> None:
        if job.hub_id in self._following:
            return
        self._following.add(job.hub_id)
        try:
            await self._drive(job)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("cannot carry on with an API job; a restart tries again", job=job.hub_id)
        finally:
            self._following.discard(job.hub_id)

    async def _drive(self, job: ApiJob) -> None:
        identity = identity_from_json(job.identity, f"API job {job.hub_id}")
        if job.phase == "confirmed":
            try:
                await self.client.retrying(lambda: self.client.publish(job.hub_id, JobState.queued.value),
                                           "the job's first state")
            except HubRefused as refused:
                log.warning("the hub gave the job to another agent, or has it no longer", job=job.hub_id,
                            error=str(refused))
                self.state.close_job(job.hub_id)
                return
            self._advance(job, "taken")
        admitted = await self.host.admit(Admission(SOURCE, job.hub_id, identity, job_spec(job.job),
                                                   log_preamble=preamble(job, identity)))
        if job.job_id is None:
            job.job_id = admitted.job_id
            self._advance(job, "admitted")
        record = self.host.job(admitted.job_id)
        report = HubReport(self.client, job, state=self.state, log_path=admitted.log_path,
                           policy=lambda: self.host.policy, secrets=job_secrets(record))
        cancel = asyncio.Event()
        if await report.catch_up():
            self._cancelled(admitted.job_id, cancel)
        record = self.host.job(admitted.job_id)
        if job.phase != "running" and record is not None and record.state.is_terminal:
            # Denied by the policy, or ended by a failed checkout before a restart: it never runs.
            await self._conclude(job, report, Ended(record.state, record.exit_status, record.outcome_detail))
            return
        watcher = asyncio.ensure_future(report.watch_cancel(
            cancel, self.cancel_interval, lambda: self._cancelled(admitted.job_id, cancel)))
        try:
            runner = self.host.resume
            if job.phase != "running":
                if record is not None:
                    report.on_change(record)
                failed = await self._check_out(job, admitted.job_id, admitted.workspace)
                if failed is not None:
                    await self._conclude(job, report, failed)
                    return
                self._advance(job, "running")
                runner = self.host.run
            ended = await runner(admitted.job_id, sink=report.sink, cancel=cancel, offset=report.acknowledged,
                                 on_change=report.on_change)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self._conclude(job, report, ended)

    def _advance(self, job: ApiJob, phase: Phase) -> None:
        job.phase = phase
        self.state.save(job)

    def _cancelled(self, job_id: str, cancel: asyncio.Event) -> None:
        if not cancel.is_set():
            log.info("cancelling an API job, as asked at the hub", job=job_id)
            self.host.note(job_id, "hpc-runner: cancelled through the hub's API\n")
            cancel.set()

    async def _check_out(self, job: ApiJob, job_id: str, workspace: Path) -> Ended | None:
        """The job's workspace made; None when done, else how the job ended (it never runs)."""
        if job.clone_url is None or job.commit is None:
            await empty_workspace(workspace)
            return None
        token = None
        if self.tokens is not None:
            try:
                token = await self.tokens.for_url(job.clone_url)
            except NoAppToken as exc:
                self.host.note(job_id, f"hpc-runner: {exc}; checking out without credentials\n")
        self.host.note(job_id, f"hpc-runner: checking out {job.commit} of {job.repository}\n")
        try:
            await self._checkout(job.clone_url, job.commit, workspace, ref=job.ref, token=token)
        except CheckoutFailed as exc:
            return end_failed_checkout(self.host, job_id, exc)
        return None

    async def _conclude(self, job: ApiJob, report: HubReport, ended: Ended) -> None:
        record = self.host.job(job.job_id or "")
        if record is not None:
            await report.conclude(ended, record)
        self.state.close_job(job.hub_id)
        log.info("API job reported", job=job.hub_id, state=ended.state.value, exit_status=ended.exit_status)


# ---------------------------------------------------------------------------- the agent's entry points


def check_api(config: ApiConfig) -> None:
    """Read the hub token file now, so a bad file stops the agent before it takes a job."""
    read_secret_file(config.hub_token_file, what=FILE_DESCRIPTIONS["hub_token_file"])


async def serve_api(config: ApiConfig, host: JobHost, *, state_dir: Path, issuers: tuple[OidcIssuer, ...],
                    slots: int, github: GithubConfig | None = None) -> None:
    """`hub_url` of `hpc-runner agent`: the hub's API jobs for `config.cluster`, verified against
    `issuers` (the agent's own `[[oidc]]`), at most `slots` in flight, until the host drains; with
    `github` (the agent's `[github]`), the App's tokens open the repositories it is installed on."""
    async with HubClient.from_files(config.hub_url, config.hub_token_file) as client, \
            aiohttp.ClientSession() as session:
        tokens = None
        if github is not None:
            auth = AppAuth(github.app_id, load_private_key(github.private_key_file))
            tokens = AppCheckoutTokens(auth, GitHubClient(session, api_url=github.api_url, auth=auth),
                                       api_url=github.api_url)
        with ApiState.open(state_dir) as state:
            source = ApiSource(config, host, client=client, state=state, verifier=TokenVerifier(issuers),
                               slots=slots, tokens=tokens)
            await source.serve()
