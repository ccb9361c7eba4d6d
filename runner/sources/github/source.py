"""The GitHub source: triggers in, confirmed through the API, run on the cluster, reported as check runs.

In poll mode (the default) the agent polls its repositories itself (`poller`); in gateway mode it
long-polls the webhook gateway for deliveries, keeps each delivery leased while its jobs run and
acknowledges it once they are reported. Either way a trigger goes the same path:

1. `confirm` reads through the API, with the app's own credentials, what the trigger claims, and
   `triggers.assess` decides: run (as which identity, at which SHA), ask for approval (a check run
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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from runner.config import GithubConfig
from runner.errors import HpcRunnerError, InputError
from runner.identity import Identity, identity_from_json
from runner.logging_setup import get_logger
from runner.logs.redact import secret_values
from runner.policy import Decision
from runner.sources import Admission, Ended, JobHost
from runner.sources.github import checks, triggers
from runner.sources.github.appauth import AppAuth, load_private_key
from runner.sources.github.checkout import CheckoutFailed, checkout
from runner.sources.github.checks import LogTail, Outcome, Report, code, log_text
from runner.sources.github.confirm import Confirmed, Confirmer, NotConfirmed
from runner.sources.github.gateway_client import (
    Delivery,
    GatewayAuthError,
    GatewayClient,
    GatewayError,
    LeaseLost,
)
from runner.sources.github.jobsfile import JOBS_FILE, decode_contents, parse_jobs_file
from runner.sources.github.poller import Poller
from runner.sources.github.rest import GitHubClient, GitHubError, GitHubHTTPError, api_path
from runner.sources.github.state import GithubState, RunRow
from runner.sources.github.triggers import CancelRequest, Ignore, NeedsApproval, Run, Trigger
from runner.spec import JobSpec, parse_job_mapping
from runner.store import JobState

log = get_logger("runner.sources.github")

SOURCE = "github"
MAX_DELIVERIES_IN_FLIGHT = 32
# How often a running job's state is looked at; GitHub hears of it at most every update_interval.
TICK_SECONDS = 1.0
RETRY_SECONDS = 60.0
FINAL_REPORT_ATTEMPTS = 10


class Retry(HpcRunnerError):
    """GitHub could not be asked now; the trigger is looked at again later."""


@dataclass
class RunState:
    """What `runs.data` holds for one job: enough to follow and report it after a restart."""

    external_id: str
    trigger_key: str
    repository: str
    sha: str
    job: str
    spec: dict[str, Any]
    identity: dict[str, Any]
    ref: str
    clone_url: str
    number: int | None = None
    job_id: str | None = None
    summary: str = ""
    title: str = ""
    details_url: str | None = None
    kind: str | None = None             # "check" or "status" once the report exists
    check_run_id: int | None = None
    phase: str = "new"                  # new, admitted, running (host.run called), reported

    @classmethod
    def from_row(cls, row: RunRow) -> RunState:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in row.data.items() if k in known})


@dataclass
class _Live:
    """A job this agent is running now, for cancellation."""

    state: RunState
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled_by: str | None = None


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
        self._redacted_vars = redacted_vars
        self._checkout = checkout_fn
        self.confirmer = Confirmer(client, config)
        self.poller = Poller(client, state, config)
        self.forbidden: set[str] = set()          # repositories where checks are not allowed
        self._live: dict[str, _Live] = {}         # external id -> running job
        self._triggers: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._how_to = triggers.how_to_approve(config.trigger_label, config.comment_command)
        self.stopped = asyncio.Event()

    # ---------------------------------------------------------------------------- serving

    async def serve(self) -> None:
        wildcards = triggers.wildcard_teams(self.host.policy)
        if wildcards:
            log.warning("the policy names every team of an organisation; GitHub identities only hold "
                        "the teams the policy names one by one", principals=list(wildcards))
        try:
            self._resume_all()
            if self.config.mode == "gateway":
                await self._serve_gateway()
            else:
                await self._serve_polling()
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
        finally:
            # Cancelled (the agent stops at once): what runs is left as it is, for the next start
            # to follow again; nothing is reported as ended that did not end.
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
            self.stopped.set()
            log.info("GitHub source stopped")

    async def wait_idle(self) -> None:
        """Until every trigger taken so far has its jobs reported (tests and benchmarks use this)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.host.draining.wait(), seconds)

    async def _serve_polling(self) -> None:
        while not self.host.draining.is_set():
            for repository in self.config.repositories:
                if self.host.draining.is_set():
                    break
                await self.poll_once(repository)
            await self._wait(self.config.poll_interval)

    async def poll_once(self, repository: str) -> None:
        """One round for one repository: list what changed, act on each item in order."""
        try:
            observed = await self.poller.poll(repository)
        except (GitHubError, NotConfirmed) as exc:
            log.warning("polling GitHub failed; trying again next round", repository=repository,
                        error=str(exc))
            return
        for item in observed:
            try:
                if isinstance(item.item, Trigger):
                    await self.take(item.item)
                elif isinstance(item.item, CancelRequest):
                    await self.cancel(item.item)
            except Retry as exc:
                log.warning("trigger not handled yet; trying again next round", repository=repository,
                            error=str(exc))
                return
            item.mark()

    # ---------------------------------------------------------------------------- gateway mode

    async def _serve_gateway(self) -> None:
        assert self.gateway is not None
        slots = asyncio.Semaphore(MAX_DELIVERIES_IN_FLIGHT)
        failures = 0
        while not self.host.draining.is_set():
            await slots.acquire()
            taking = asyncio.ensure_future(self.gateway.next_delivery())
            draining = asyncio.ensure_future(self.host.draining.wait())
            await asyncio.wait({taking, draining}, return_when=asyncio.FIRST_COMPLETED)
            draining.cancel()
            if not taking.done():
                taking.cancel()
                with contextlib.suppress(asyncio.CancelledError, GatewayError):
                    await taking
                slots.release()
                return
            try:
                delivery = taking.result()
            except GatewayError as exc:
                slots.release()
                failures += 1
                if isinstance(exc, GatewayAuthError):
                    # Only a new token (or the gateway's tokens file fixed) helps: say so loudly.
                    log.error("the gateway refuses this agent's token; retrying in a minute", error=str(exc))
                    await self._wait(60.0)
                    continue
                log.warning("gateway not reachable; retrying", error=str(exc), failures=failures)
                await self._wait(min(60.0, 2.0 ** min(failures, 6)) if exc.retry_after is None
                                 else exc.retry_after)
                continue
            failures = 0
            if delivery is None:
                slots.release()
                continue
            task = self._spawn(self.serve_delivery(delivery))
            task.add_done_callback(lambda _: slots.release())

    async def serve_delivery(self, delivery: Delivery) -> None:
        """Act on one delivery while keeping its lease; acknowledge once its jobs are reported."""
        assert self.gateway is not None
        item = triggers.from_delivery(
            delivery.event, delivery.payload, repositories=self.config.repositories,
            trigger_label=self.config.trigger_label, comment_command=self.config.comment_command,
            push_branches=self.config.push_branches, delivery_id=delivery.delivery_id)
        release = False
        async with self.gateway.keep_leased(delivery) as kept:
            try:
                if isinstance(item, Trigger):
                    done = await self.take(item, recheck_github=delivery.attempt > 1)
                    if done is not None:
                        await done
                elif isinstance(item, CancelRequest):
                    await self.cancel(item)
            except Retry as exc:
                log.warning("delivery not handled; giving it back to the gateway",
                            delivery=delivery.delivery_id, error=str(exc))
                release = True
            if kept.lost.is_set():
                log.warning("the delivery's lease was lost while its jobs ran; they were reported all the "
                            "same", delivery=delivery.delivery_id)
        try:
            if release:
                await self.gateway.release(delivery)
            else:
                await self.gateway.acknowledge(delivery)
        except LeaseLost:
            log.info("the delivery's lease had run out; an agent that gets it finds its check runs",
                     delivery=delivery.delivery_id)
        except GatewayError as exc:
            log.warning("could not acknowledge a delivery", delivery=delivery.delivery_id, error=str(exc))

    # ---------------------------------------------------------------------------- triggers

    async def take(self, trigger: Trigger, *, recheck_github: bool = False) -> asyncio.Task[None] | None:
        """Confirm and record a trigger; its jobs run in a task (returned) that ends once they are
        reported. None when there is nothing (more) to run."""
        repository = trigger.repository
        try:
            event = None
            if trigger.kind == "label":
                assert trigger.number is not None
                event = await self.confirmer.label_event(repository, trigger.number)
                if event is not None and trigger.sha is not None \
                        and self._seen(trigger, event.id, trigger.sha):
                    return self._triggers.get(triggers.trigger_key(trigger, label_event=event.id))
            confirmed = await self.confirmer.confirm(
                trigger, team_names=triggers.policy_teams(self.host.policy),
                bound_sha_of=lambda event: self._bound_sha(trigger, event.id), label_event=event)
        except NotConfirmed as exc:
            log.info("trigger not confirmed by the API; nothing runs", trigger=trigger.describe(),
                     repository=repository, reason=str(exc))
            return None
        except GitHubHTTPError as exc:
            if exc.status in (401, 403, 404, 422):
                log.warning("GitHub refused to confirm a trigger; nothing runs", trigger=trigger.describe(),
                            repository=repository, error=str(exc))
                return None
            raise Retry(str(exc)) from None
        except GitHubError as exc:
            raise Retry(str(exc)) from None
        facts = confirmed.facts
        # From here on the trigger names who the API says acted, not who the hint said.
        trigger = replace(trigger, actor=facts.actor)
        if trigger.kind == "label" and not confirmed.labelled:
            log.info("the label is no longer on the pull request", repository=repository,
                     number=trigger.number)
            return None
        verdict = triggers.assess(trigger, facts, how_to=self._how_to)
        if isinstance(verdict, Ignore):
            log.info("trigger ignored", repository=repository, reason=verdict.reason)
            if trigger.kind == "comment":
                self.state.claim_trigger(triggers.trigger_key(trigger), repository=repository, kind="comment",
                                         sha=None, outcome="ignored", detail=verdict.reason)
            return None
        key = self._key(trigger, confirmed)
        if isinstance(verdict, NeedsApproval):
            await self._ask_approval(trigger, confirmed, verdict, key)
            return None
        assert isinstance(verdict, Run) and key is not None
        existing = self.state.trigger(key)
        if existing is not None:
            # Seen before (a redelivery, a restart): never run twice; wait for it if it still runs.
            if existing.outcome != "running":
                return None
            return self._triggers.get(key) or self._restart_trigger(key)
        if recheck_github and await self._claimed_elsewhere(repository, verdict.sha, key):
            self.state.claim_trigger(key, repository=repository, kind=trigger.kind, sha=verdict.sha,
                                     outcome="elsewhere", detail="another agent reported it")
            return None
        ref = f"refs/heads/{trigger.branch}" if trigger.kind == "push" else f"refs/pull/{trigger.number}/head"
        clone_url = confirmed.clone_url or await self._clone_url(repository)
        detail = {"trigger": asdict(trigger), "sha": verdict.sha, "identity": verdict.identity.to_json(),
                  "ref": ref, "clone_url": clone_url}
        if not self.state.claim_trigger(key, repository=repository, kind=trigger.kind, sha=verdict.sha,
                                        outcome="running", detail=_json(detail)):
            return self._triggers.get(key)
        log.info("trigger confirmed; running its jobs", repository=repository, trigger=trigger.describe(),
                 sha=verdict.sha, key=key)
        if trigger.number is not None:
            await self._resolve_approval(trigger, verdict.sha)
        return self._start_trigger(key, detail)

    def _key(self, trigger: Trigger, confirmed: Confirmed) -> str | None:
        if trigger.kind == "label":
            if confirmed.label_event is None:
                return None
            return triggers.trigger_key(trigger, label_event=confirmed.label_event.id)
        return triggers.trigger_key(trigger)

    def _seen(self, trigger: Trigger, event_id: int, sha: str) -> bool:
        """Whether this label event was already acted on for this head (run, or approval asked)."""
        row = self.state.trigger(triggers.trigger_key(trigger, label_event=event_id))
        if row is not None and row.sha == sha:
            return True
        return row is not None and self.state.trigger(_approval_marker(trigger.repository, trigger.number,
                                                                       sha)) is not None

    def _bound_sha(self, trigger: Trigger, event_id: int) -> str | None:
        row = self.state.trigger(triggers.trigger_key(trigger, label_event=event_id))
        return row.sha if row is not None else None

    async def _clone_url(self, repository: str) -> str:
        try:
            return await self.confirmer.clone_url(repository)
        except (GitHubError, NotConfirmed) as exc:
            raise Retry(str(exc)) from None

    async def _claimed_elsewhere(self, repository: str, sha: str, key: str) -> bool:
        """Whether another agent already created check runs for this trigger (its lease ran out)."""
        owner, name = repository.split("/")
        path = api_path("/repos/{owner}/{repo}/commits/{ref}/check-runs", owner=owner, repo=name, ref=sha)
        try:
            params: dict[str, str | int] = {"app_id": self.config.app_id, "filter": "all"}
            async for run in self.client.paginate(path, params=params, key="check_runs"):
                if str(run.get("external_id") or "").startswith(key + "/"):
                    log.info("another agent already reports this trigger; leaving it alone", key=key)
                    return True
        except GitHubHTTPError as exc:
            if exc.status != 403:
                raise Retry(str(exc)) from None
        except GitHubError as exc:
            raise Retry(str(exc)) from None
        return False

    async def _ask_approval(self, trigger: Trigger, confirmed: Confirmed, verdict: NeedsApproval,
                            key: str | None) -> None:
        """Say on the commit, once per SHA, why it did not run and how to approve it."""
        repository = trigger.repository
        if key is not None and self.state.trigger(key) is None:
            # A label event approves the commit it was applied at and never a later one, even when
            # it could not approve that one either.
            bound = trigger.sha if trigger.sha and trigger.sha != verdict.sha else verdict.sha
            self.state.claim_trigger(key, repository=repository, kind="label", sha=bound,
                                     outcome="needs_approval", detail="; ".join(verdict.reasons))
        marker = _approval_marker(repository, trigger.number, verdict.sha)
        if self.state.trigger(marker) is not None:
            return
        log.info("trigger needs an approval", repository=repository, number=trigger.number, sha=verdict.sha,
                 reasons=list(verdict.reasons))
        report = self._report(repository, verdict.sha, None, marker, None, cancellable=False)
        summary = checks.summary({
            "Trigger": f"{trigger.describe()} on commit {code(verdict.sha[:12])}",
            "Fork": "yes: its code runs only once someone with write permission approved this commit"
                    if confirmed.facts.fork else "no",
            "Why it did not run": list(verdict.reasons)})
        try:
            await report.open(title="Waiting for approval by someone with write permission", summary=summary,
                              conclusion="action_required")
        except GitHubError as exc:
            raise Retry(f"could not report that a trigger needs approval: {exc}") from None
        self.state.claim_trigger(marker, repository=repository, kind=trigger.kind, sha=verdict.sha,
                                 outcome="needs_approval",
                                 detail=_json({"kind": report.kind, "check_run_id": report.check_run_id}))

    async def _resolve_approval(self, trigger: Trigger, sha: str) -> None:
        """An approval came for a commit that was waiting for one: its `hpc-runner` check says so."""
        marker = _approval_marker(trigger.repository, trigger.number, sha)
        row = self.state.trigger(marker)
        if row is None or row.outcome != "needs_approval" or not row.detail:
            return
        ref = json.loads(row.detail)
        report = self._report(trigger.repository, sha, None, marker, None, kind=ref.get("kind"),
                              check_run_id=ref.get("check_run_id"), cancellable=False)
        outcome = Outcome("success", f"Approved by @{trigger.actor}")
        summary = checks.summary({"Approved": f"{trigger.describe()}; the jobs run as check runs "
                                              "named `hpc-runner/<job>`"})
        try:
            await report.complete(outcome, summary=summary, text=None)
        except GitHubError as exc:
            log.warning("could not mark the approval on GitHub", repository=trigger.repository,
                        error=str(exc))
            return
        self.state.set_trigger_outcome(marker, "approved", row.detail)

    # ---------------------------------------------------------------------------- a trigger's jobs

    def _start_trigger(self, key: str, detail: dict[str, Any]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = self._spawn(self._run_trigger(key, detail))
        self._triggers[key] = task
        task.add_done_callback(lambda _: self._triggers.pop(key, None))
        return task

    def _restart_trigger(self, key: str) -> asyncio.Task[None] | None:
        row = self.state.trigger(key)
        if row is None or row.detail is None:
            return None
        return self._start_trigger(key, json.loads(row.detail))

    async def _run_trigger(self, key: str, detail: dict[str, Any]) -> None:
        trigger = Trigger(**detail["trigger"])
        sha: str = detail["sha"]
        repository = trigger.repository
        while True:
            try:
                jobs = await self._jobs(key, trigger, sha)
                break
            except Retry as exc:
                log.warning("cannot read the jobs file yet; trying again in a minute", repository=repository,
                            error=str(exc))
                await self._wait(self.retry_seconds)
                if self.host.draining.is_set():
                    return
        runs = []
        for spec in jobs:
            external_id = f"{key}/{spec.name}"
            if self.state.run_done(external_id):
                continue
            row = self.state.run(external_id)
            if row is not None:
                live = self._live.get(external_id)
                if live is None:
                    runs.append(self._follow(RunState.from_row(row)))
                continue
            state = RunState(external_id=external_id, trigger_key=key, repository=repository, sha=sha,
                             job=spec.name, spec=spec.to_table(), identity=detail["identity"],
                             ref=detail["ref"], clone_url=detail["clone_url"], number=trigger.number)
            self._save(state)
            runs.append(self._follow(state))
        await asyncio.gather(*runs)
        if not self.state.open_runs_of(key):
            self.state.set_trigger_outcome(key, "done")

    async def _jobs(self, key: str, trigger: Trigger, sha: str) -> tuple[JobSpec, ...]:
        """The jobs at `sha`; a missing or broken file is reported on the commit and yields none."""
        owner, name = trigger.repository.split("/")
        path = api_path("/repos/{owner}/{repo}/contents/{path}", owner=owner, repo=name, path=JOBS_FILE)
        problem: tuple[checks.Conclusion, str, str] | None = None
        try:
            answer = await self.client.get(path, params={"ref": sha})
            jobs = parse_jobs_file(decode_contents(answer), JOBS_FILE)
        except GitHubHTTPError as exc:
            if exc.status != 404:
                raise Retry(str(exc)) from None
            problem = ("neutral", f"No {JOBS_FILE} at this commit",
                       f"The repository has no `{JOBS_FILE}` at commit {code(sha[:12])}, so there is nothing "
                       "to run. Add `[[jobs]]` tables to it (see the hpc-runner README).")
        except GitHubError as exc:
            raise Retry(str(exc)) from None
        except InputError as exc:
            problem = ("failure", f"{JOBS_FILE} is not valid",
                       f"The jobs file at commit {code(sha[:12])} cannot be used:\n\n"
                       + checks.code_block(str(exc), 8000, cut_note=""))
        if problem is None:
            return jobs
        conclusion, title, text = problem
        log.info("no jobs to run", repository=trigger.repository, sha=sha, why=title)
        external_id = f"{key}/{JOBS_FILE}"
        if not self.state.run_done(external_id):
            report = self._report(trigger.repository, sha, None, external_id, None, cancellable=False)
            try:
                await report.open(title=title, summary=text + "\n", conclusion=conclusion)
            except GitHubError as exc:
                raise Retry(f"could not report the jobs file's problem: {exc}") from None
            self.state.put_run(external_id, trigger_key=key, repository=trigger.repository,
                               data={"file": True})
            self.state.close_run(external_id)
        return ()

    # ---------------------------------------------------------------------------- one job

    def _save(self, state: RunState) -> None:
        self.state.put_run(state.external_id, trigger_key=state.trigger_key, repository=state.repository,
                           data=asdict(state))

    def _report(self, repository: str, sha: str, job: str | None, external_id: str,
                details_url: str | None, *, kind: str | None = None, check_run_id: int | None = None,
                cancellable: bool = True) -> Report:
        return Report(self.client, repository=repository, sha=sha, name=checks.check_name(job),
                      external_id=external_id, details_url=details_url, forbidden=self.forbidden, kind=kind,
                      check_run_id=check_run_id, cancellable=cancellable)

    def _run_report(self, state: RunState) -> Report:
        return self._report(state.repository, state.sha, state.job, state.external_id, state.details_url,
                            kind=state.kind, check_run_id=state.check_run_id)

    async def _follow(self, state: RunState) -> None:
        """Take one job from wherever it got (a restart may find it anywhere) to its final report."""
        live = _Live(state)
        self._live[state.external_id] = live
        try:
            while True:
                try:
                    await self._drive(state, live)
                    return
                except GitHubError as exc:
                    # Every step is recorded and repeatable (admission, the check run found
                    # again by its external id, the checkout from scratch): try again later.
                    log.warning("GitHub did not answer while preparing a job; trying again",
                                job=state.external_id, error=str(exc), retry_in=self.retry_seconds)
                    await self._wait(self.retry_seconds)
                    if self.host.draining.is_set():
                        return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("cannot carry on with a GitHub job; a restart tries again", job=state.external_id)
        finally:
            self._live.pop(state.external_id, None)

    async def _drive(self, state: RunState, live: _Live) -> None:
        spec = parse_job_mapping(state.spec, f"{state.repository}:{JOBS_FILE}")
        identity = identity_from_json(state.identity, f"GitHub job {state.external_id}")
        admitted = self.host.admit(Admission(SOURCE, state.external_id, identity, spec,
                                             log_preamble=self._preamble(state, identity)))
        fresh = state.job_id is None
        if fresh:
            state.job_id = admitted.job_id
            state.details_url = checks.details_url(self.config.log_url, admitted.job_id)
            state.summary = self._summary(state, identity, admitted.decision)
            state.title = _queued_title(admitted.decision)
            state.phase = "admitted"
            self._save(state)
        report = self._run_report(state)
        if not admitted.decision.allowed:
            report.status_note = "; ".join(admitted.decision.reasons)
            await self._finish(state, report, Ended(JobState.denied, None, None), LogTail())
            return
        if state.kind is None:
            # An earlier agent may have created it and stopped before it saved the id.
            found = None if fresh else await report.find()
            if found is not None:
                report.kind, report.check_run_id = "check", found
            else:
                await report.open(title=state.title, summary=state.summary)
            state.kind, state.check_run_id = report.kind, report.check_run_id
            self._save(state)
        tail = LogTail(self._secrets(spec))
        if state.phase != "running":
            token = await self._token(state.repository)
            tail = LogTail(self._secrets(spec, token))
            self.host.note(admitted.job_id, f"hpc-runner: checking out {state.sha} ({state.ref})\n")
            try:
                await self._checkout(state.clone_url, state.sha, admitted.workspace, ref=state.ref,
                                     token=token)
            except CheckoutFailed as exc:
                output = exc.output if exc.output.endswith("\n") or not exc.output else exc.output + "\n"
                self.host.note(admitted.job_id, output + f"hpc-runner: {exc}\n")
                ended = self.host.fail(admitted.job_id, str(exc))
                await self._finish(state, report, ended, self._tail_from_file(admitted.log_path, tail))
                return
            state.phase = "running"
            self._save(state)
            runner = self.host.run
        else:
            record = self.host.store.get_job(admitted.job_id)
            offset = record.log_offset if record is not None else 0
            tail = self._tail_from_file(admitted.log_path, tail, end=offset)
            runner = self.host.resume
        ended = await self._watch(state, report, live, tail, runner)
        await self._finish(state, report, ended, tail, live.cancelled_by)

    async def _token(self, repository: str) -> str:
        installation = await self.auth.installation_for(self.client, repo=repository)
        return await self.auth.token(self.client, installation, time.time())

    def _secrets(self, spec: JobSpec, token: str | None = None) -> list[str]:
        found = secret_values(dict(spec.env), self._redacted_vars)
        return [*found, token] if token else found

    def _tail_from_file(self, path: Path, tail: LogTail, end: int | None = None) -> LogTail:
        try:
            with path.open("rb") as handle:
                data = handle.read() if end is None else handle.read(end)
        except OSError:
            return tail
        tail.seed(data, len(data))
        return tail

    async def _watch(self, state: RunState, report: Report, live: _Live, tail: LogTail,
                     runner: Callable[..., Awaitable[Ended]]) -> Ended:
        """Run the job; meanwhile tell GitHub how it goes, at most every `update_interval`."""
        assert state.job_id is not None
        job_id = state.job_id
        store = self.host.store

        async def sink(offset: int, data: bytes) -> None:
            if not data and offset == 0:
                store.set_log_offset(job_id, 0, reset=True)
            tail.feed(offset, data)

        running = asyncio.ensure_future(runner(job_id, sink=sink, cancel=live.cancel))
        try:
            return await self._report_progress(state, report, tail, running)
        except asyncio.CancelledError:
            running.cancel()
            raise

    async def _report_progress(self, state: RunState, report: Report, tail: LogTail,
                               running: asyncio.Future[Ended]) -> Ended:
        assert state.job_id is not None
        job_id = state.job_id
        store = self.host.store
        sent_version = -1
        sent_status = "queued"
        last_write = time.monotonic()
        tick = min(TICK_SECONDS, self.update_interval / 4)
        while not running.done():
            await asyncio.wait({running}, timeout=tick)
            if running.done():
                break
            record = store.get_job(job_id)
            status = "in_progress" if (record is not None and record.state == JobState.running) or tail.end \
                else "queued"
            changed = tail.version != sent_version or status != sent_status
            if not changed or time.monotonic() - last_write < self.update_interval:
                continue
            if tail.end:
                store.set_log_offset(job_id, tail.end)
            try:
                await report.update(title=_progress_title(status, state), summary=state.summary,
                                    text=log_text(tail, full_log=state.details_url),
                                    status="in_progress" if status != sent_status else None)
                sent_version, sent_status = tail.version, status
            except GitHubError as exc:
                log.warning("could not update the check run; trying again later", job=job_id, error=str(exc))
            last_write = time.monotonic()
        ended = running.result()
        if tail.end:
            store.set_log_offset(job_id, tail.end)
        return ended

    async def _finish(self, state: RunState, report: Report, ended: Ended, tail: LogTail,
                      cancelled_by: str | None = None) -> None:
        tail.close()
        outcome = checks.outcome_of(ended)
        if cancelled_by and ended.state == JobState.cancelled:
            outcome = Outcome("cancelled", f"Cancelled by {cancelled_by}", outcome.lines)
        elif ended.state == JobState.cancelled and self.host.stopping.is_set():
            outcome = Outcome("cancelled", "Cancelled: the agent was stopped", outcome.lines)
        summary = state.summary
        if outcome.lines:
            summary += "\n" + checks.summary({"Outcome": list(outcome.lines)})
        text = log_text(tail, full_log=state.details_url)
        for attempt in range(1, FINAL_REPORT_ATTEMPTS + 1):
            try:
                if report.kind is None:
                    await report.open(title=outcome.title, summary=summary, conclusion=outcome.conclusion,
                                      text=text)
                    state.kind, state.check_run_id = report.kind, report.check_run_id
                else:
                    await report.complete(outcome, summary=summary, text=text)
                break
            except GitHubError as exc:
                log.error("could not send the job's final report", job=state.external_id, error=str(exc),
                          attempt=attempt)
                if attempt == FINAL_REPORT_ATTEMPTS or self.host.stopping.is_set():
                    # The run stays open: the next start of the agent sends the report.
                    return
                await asyncio.sleep(self.retry_seconds)
        state.phase = "reported"
        self._save(state)
        self.state.close_run(state.external_id)
        log.info("GitHub job reported", job=state.external_id, conclusion=outcome.conclusion)

    def _preamble(self, state: RunState, identity: Identity) -> str:
        return (f"hpc-runner: GitHub {state.repository} commit {state.sha} ({state.ref}), "
                f"job {state.job}, as {identity.actor_principal}\n")

    def _summary(self, state: RunState, identity: Identity, decision: Decision) -> str:
        principals = ", ".join(code(p) for p in identity.principals())
        sections: dict[str, Any] = {
            "Commit": f"{code(state.sha)} ({code(state.ref)})",
            "Identity": f"{principals}; event {code(identity.effective_event)}; fork: "
                        f"{'yes' if identity.fork else 'no'}",
        }
        if decision.allowed and decision.slurm is not None:
            slurm = decision.slurm
            sections["Decision"] = (
                f"allowed by grant {code(decision.grant)}: account {code(decision.account)} (Slurm account "
                f"{code(slurm.account)}), partition {code(slurm.partition)}, {slurm.nodes} node(s), "
                f"{slurm.tasks} task(s), walltime {code(slurm.to_json()['time'])}")
            sections["Notes"] = list(decision.notes)
        else:
            sections["Decision"] = "denied by the site's policy"
            sections["Reasons"] = list(decision.reasons)
        cancel = triggers.cancel_command(self.config.comment_command or "")
        if cancel and state.number is not None:
            sections["Cancel"] = f"comment {code(cancel)} on the pull request (write permission needed)"
        if state.details_url:
            sections["Full log"] = state.details_url
        return checks.summary(sections)

    # ---------------------------------------------------------------------------- cancel

    async def cancel(self, request: CancelRequest) -> None:
        """Cancel the jobs a request names, if its author has write permission (asked through the API)."""
        actor = request.actor
        try:
            if request.comment_id is not None:
                comment = await self.confirmer.comment(request.repository, request.comment_id)
                user = comment.get("user") or {}
                command = self.config.comment_command or ""
                verb = triggers.comment_verb(str(comment.get("body") or ""), command)
                if triggers.is_bot(user) or verb != "cancel":
                    return
                actor = str(user.get("login"))
            if actor is None:
                return
            permission = await self.confirmer.permission(request.repository, actor)
        except NotConfirmed:
            return
        except GitHubError as exc:
            raise Retry(str(exc)) from None
        if not triggers.has_write(permission):
            log.info("cancel request ignored: no write permission", actor=actor,
                     repository=request.repository)
            return
        for live in list(self._live.values()):
            state = live.state
            if state.repository.lower() != request.repository.lower():
                continue
            hit = (request.check_run_id is not None and state.check_run_id == request.check_run_id) or \
                  (request.number is not None and state.number == request.number)
            if hit and not live.cancel.is_set():
                live.cancelled_by = f"@{actor}"
                if state.job_id is not None:
                    self.host.note(state.job_id, f"hpc-runner: cancelled on GitHub by @{actor}\n")
                log.info("cancelling a GitHub job", job=state.external_id, actor=actor)
                live.cancel.set()

    # ---------------------------------------------------------------------------- restarts

    def _resume_all(self) -> None:
        """Carry on with what a previous agent left: every trigger still running (its open runs are
        followed again, the runs it had not made yet are made)."""
        for row in self.state.triggers_with("running"):
            if row.key not in self._triggers:
                log.info("carrying on with a GitHub trigger after a restart", key=row.key)
                self._restart_trigger(row.key)


def _approval_marker(repository: str, number: int | None, sha: str) -> str:
    return f"approval:{repository.lower()}#{number}@{sha}"


def _json(data: Any) -> str:
    return json.dumps(data, sort_keys=True)


def _queued_title(decision: Decision) -> str:
    if not decision.allowed:
        return "Denied by the site's policy"
    slurm = decision.slurm
    partition = f" on partition {slurm.partition}" if slurm is not None else ""
    return f"Queued: account {decision.account}{partition}"


def _progress_title(status: str, state: RunState) -> str:
    return "Running on the cluster" if status == "in_progress" else "Queued"


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
