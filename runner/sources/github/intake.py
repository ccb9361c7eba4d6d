"""Triggers in: taken from polling or from the gateway, confirmed through the API, recorded once.

`poll_once` lists what changed in a repository; in gateway mode `serve_gateway` long-polls the
gateway and `serve_delivery` keeps each delivery leased while its jobs run, acknowledging it once
they are reported (or giving it back when GitHub could not be asked). Either way `take` confirms a
trigger (`confirm`, `translate.assess`), records it under its key so it is acted on once, and hands
it to `runs`; a commit that needs an approval gets an `action_required` report instead (once per
commit for a label, for every refused run command of someone with write permission), marked
approved once an approval comes. `cancel` checks that a cancel request's author may write to the
repository before `runs` cancels the jobs it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import asdict, replace
from typing import Any

from runner.config import GithubConfig
from runner.logging_setup import get_logger
from runner.sources import JobHost
from runner.sources.github import checks, translate
from runner.sources.github.checks import Completion, code
from runner.sources.github.client import GitHubClient, GitHubError, GitHubHTTPError, api_path
from runner.sources.github.confirm import Confirmed, Confirmer, NotConfirmed
from runner.sources.github.gateway_client import (
    Delivery,
    GatewayAuthError,
    GatewayClient,
    GatewayError,
    LeaseLost,
)
from runner.sources.github.poller import Poller
from runner.sources.github.report import Reports
from runner.sources.github.runs import Retry, Runs
from runner.sources.github.state import GithubState
from runner.sources.github.translate import CancelRequest, Ignore, NeedsApproval, Run, Trigger
from runner.tasks import TaskSet, pause

log = get_logger("runner.sources.github")

MAX_DELIVERIES_IN_FLIGHT = 32


class Intake:
    """Takes the triggers of `[github]` in, for `runs` to run (see the module docstring)."""

    def __init__(self, config: GithubConfig, host: JobHost, *, client: GitHubClient, state: GithubState,
                 confirmer: Confirmer, poller: Poller, gateway: GatewayClient | None, runs: Runs,
                 reports: Reports, background: TaskSet) -> None:
        self.config = config
        self.host = host
        self.client = client
        self.state = state
        self.confirmer = confirmer
        self.poller = poller
        self.gateway = gateway
        self.runs = runs
        self.reports = reports
        self.background = background

    # ---------------------------------------------------------------------------- poll mode

    async def serve_polling(self) -> None:
        while not self.host.draining.is_set():
            for repository in self.config.repositories:
                if self.host.draining.is_set():
                    break
                await self.poll_once(repository)
            await pause(self.config.poll_interval, self.host.draining)

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

    async def serve_gateway(self) -> None:
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
                    await pause(60.0, self.host.draining)
                    continue
                log.warning("gateway not reachable; retrying", error=str(exc), failures=failures)
                backoff = min(60.0, 2.0 ** min(failures, 6)) if exc.retry_after is None else exc.retry_after
                await pause(backoff, self.host.draining)
                continue
            failures = 0
            if delivery is None:
                slots.release()
                continue
            task = self.background.spawn(self.serve_delivery(delivery))
            task.add_done_callback(lambda _: slots.release())

    async def serve_delivery(self, delivery: Delivery) -> None:
        """Act on one delivery while keeping its lease; acknowledge once its jobs are reported."""
        assert self.gateway is not None
        item = translate.from_delivery(
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
                    return self.runs.running(translate.trigger_key(trigger, label_event=event.id))
            confirmed = await self.confirmer.confirm(
                trigger, team_names=translate.policy_teams(self.host.policy),
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
        verdict = translate.assess(trigger, facts, how_to=translate.how_to_approve(
            self.config.trigger_label, self.config.comment_command, facts.head_sha))
        if isinstance(verdict, Ignore):
            log.info("trigger ignored", repository=repository, reason=verdict.reason)
            if trigger.kind == "comment":
                self.state.claim_trigger(translate.trigger_key(trigger), repository=repository,
                                         kind="comment", sha=None, outcome="ignored", detail=verdict.reason)
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
            return self.runs.running(key) or self.runs.restart(key)
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
            return self.runs.running(key)
        log.info("trigger confirmed; running its jobs", repository=repository, trigger=trigger.describe(),
                 sha=verdict.sha, key=key)
        if trigger.number is not None:
            await self._resolve_approval(trigger, verdict.sha)
        return self.runs.start(key, detail)

    def _key(self, trigger: Trigger, confirmed: Confirmed) -> str | None:
        if trigger.kind == "label":
            if confirmed.label_event is None:
                return None
            return translate.trigger_key(trigger, label_event=confirmed.label_event.id)
        return translate.trigger_key(trigger)

    def _seen(self, trigger: Trigger, event_id: int, sha: str) -> bool:
        """Whether this label event was already acted on for this head (run, or approval asked)."""
        row = self.state.trigger(translate.trigger_key(trigger, label_event=event_id))
        if row is not None and row.sha == sha:
            return True
        return row is not None and self.state.trigger(_approval_marker(trigger.repository, trigger.number,
                                                                       sha)) is not None

    def _bound_sha(self, trigger: Trigger, event_id: int) -> str | None:
        row = self.state.trigger(translate.trigger_key(trigger, label_event=event_id))
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

    # ---------------------------------------------------------------------------- approvals

    async def _ask_approval(self, trigger: Trigger, confirmed: Confirmed, verdict: NeedsApproval,
                            key: str | None) -> None:
        """Say on the commit why it did not run and how to approve it: once per SHA for a label, and
        for each run command (its author waits for an answer; only writers' commands get here)."""
        repository = trigger.repository
        command = trigger.kind == "comment"
        if command and key is not None and self.state.trigger(key) is not None:
            return                          # answered before (a redelivery, or a restart)
        if not command and key is not None and self.state.trigger(key) is None:
            # A label event approves the commit it was applied at and never a later one, even when
            # it could not approve that one either.
            bound = trigger.sha if trigger.sha and trigger.sha != verdict.sha else verdict.sha
            self.state.claim_trigger(key, repository=repository, kind="label", sha=bound,
                                     outcome="needs_approval", detail="; ".join(verdict.reasons))
        marker = _approval_marker(repository, trigger.number, verdict.sha)
        said = self.state.trigger(marker)
        if said is not None and not command:
            return
        log.info("trigger needs an approval", repository=repository, number=trigger.number, sha=verdict.sha,
                 reasons=list(verdict.reasons))
        # A commit still waiting keeps its one `hpc-runner` check run, which shows the latest answer.
        waiting = json.loads(said.detail) if said is not None and said.outcome == "needs_approval" \
            and said.detail else {}
        report = self.reports.for_commit(repository, verdict.sha, marker, kind=waiting.get("kind"),
                                         check_run_id=waiting.get("check_run_id"))
        title = "Waiting for approval by someone with write permission"
        summary = checks.summary({
            "Trigger": f"{trigger.describe()} on commit {code(verdict.sha[:12])}",
            "Fork": "yes: its code runs only once someone with write permission approved this commit"
                    if confirmed.facts.fork else "no",
            "Why it did not run": list(verdict.reasons)})
        try:
            if waiting.get("kind"):
                await report.complete(Completion("action_required", title), summary=summary, text=None)
            else:
                await report.open(title=title, summary=summary, conclusion="action_required")
        except GitHubError as exc:
            raise Retry(f"could not report that a trigger needs approval: {exc}") from None
        detail = _json({"kind": report.kind, "check_run_id": report.check_run_id})
        if said is None:
            self.state.claim_trigger(marker, repository=repository, kind=trigger.kind, sha=verdict.sha,
                                     outcome="needs_approval", detail=detail)
        else:
            self.state.set_trigger_outcome(marker, "needs_approval", detail)
        if command and key is not None:
            self.state.claim_trigger(key, repository=repository, kind="comment", sha=verdict.sha,
                                     outcome="needs_approval", detail="; ".join(verdict.reasons))

    async def _resolve_approval(self, trigger: Trigger, sha: str) -> None:
        """An approval came for a commit that was waiting for one: its `hpc-runner` check says so."""
        marker = _approval_marker(trigger.repository, trigger.number, sha)
        row = self.state.trigger(marker)
        if row is None or row.outcome != "needs_approval" or not row.detail:
            return
        ref = json.loads(row.detail)
        report = self.reports.for_commit(trigger.repository, sha, marker, kind=ref.get("kind"),
                                         check_run_id=ref.get("check_run_id"))
        completion = Completion("success", f"Approved by @{trigger.actor}")
        summary = checks.summary({"Approved": f"{trigger.describe()}; the jobs run as check runs "
                                              "named `hpc-runner/<job>`"})
        try:
            await report.complete(completion, summary=summary, text=None)
        except GitHubError as exc:
            log.warning("could not mark the approval on GitHub", repository=trigger.repository,
                        error=str(exc))
            return
        self.state.set_trigger_outcome(marker, "approved", row.detail)

    # ---------------------------------------------------------------------------- cancel

    async def cancel(self, request: CancelRequest) -> None:
        """Cancel the jobs a request names, if its author has write permission (asked through the API)."""
        actor = request.actor
        try:
            if request.comment_id is not None:
                comment = await self.confirmer.comment(request.repository, request.comment_id)
                user = comment.get("user") or {}
                command = self.config.comment_command or ""
                verb = translate.comment_verb(str(comment.get("body") or ""), command)
                if translate.is_bot(user) or verb != "cancel":
                    return
                actor = str(user.get("login"))
            if actor is None:
                return
            permission = await self.confirmer.permission(request.repository, actor)
        except NotConfirmed:
            return
        except GitHubError as exc:
            raise Retry(str(exc)) from None
        if not translate.has_write(permission):
            log.info("cancel request ignored: no write permission", actor=actor,
                     repository=request.repository)
            return
        self.runs.cancel(request, actor)


def _approval_marker(repository: str, number: int | None, sha: str) -> str:
    return f"approval:{repository.lower()}#{number}@{sha}"


def _json(data: Any) -> str:
    return json.dumps(data, sort_keys=True)
