"""The Buildkite source: `workers` agent sessions, each running one job at a time.

Each worker registers as its own agent (the config's tags as meta_data), connects, heartbeats on
its own timer whatever its job does, and pings every ping_interval plus jitter; a heartbeat,
ping or job-state poll that fails, unless Buildkite refuses it, is followed by the next, whatever
raised, and a `Buildkite-*` header no request may carry is left out. A session
that ends with an exception (a bug, a request aiohttp refuses to send) is logged with its
traceback and a count, disconnected, and started again after a backoff, so jobs never silently
stop being taken. A job it is given
is accepted, bounded in depth and size and checked for the types the source reads (before
anything recursive sees it), its signature verified, started, translated into an
identity and a job spec (a pull request build confirmed on GitHub when the agent has a GitHub
App), admitted by the agent's policy, checked out on this node and run through
the agent, with its log streamed as chunks and the job state polled for cancellation; then
finished exactly once, whatever its processing raises (a bug included): the session goes on with
the next job. What each job reached is stored, so a restarted agent carries on with the jobs it
had: same log offsets, one finish.

Finish statuses (Buildkite's `exit_status` / `signal_reason`):

| how the job ended | exit_status | signal_reason |
| --- | --- | --- |
| the command's exit status | its status | |
| signature missing, invalid or not matching | -1 | signature_rejected |
| refused: policy denial, unusable plugin block, a job too deep, too large or mistyped | -1 | agent_refused |
| checkout failed, Slurm refused, infrastructure error, a failure of the agent | -1 | process_run_error |
| cancelled in Buildkite (or timed out there, or the job token revoked) | -1 (signal SIGTERM) | cancel |
| cancelled by a second SIGTERM to the agent | -1 (signal SIGTERM) | agent_stop |
| reached its Slurm walltime | 124 | |
| expired: waited in Slurm's queue past its queue_time, never ran | 75 (EX_TEMPFAIL) | |

An expired job did not fail: 75 is `hpc-runner run`'s status for it too, and a pipeline may retry
it (`retry: automatic: [{exit_status: 75}]`) rather than count it against the code.

When Buildkite's job starts: a job that runs is `start`ed only once the runner job runs (in Slurm,
once Slurm starts it), so the step's `timeout_in_minutes`, which Buildkite counts from the start,
never runs while the job only waits (for a place under its account's cap, or in Slurm's queue).
Buildkite takes no log chunks before the start, so what the job's log says meanwhile (the pending
reasons, its place in the agent's queue) is held and sent first, as soon as it has started. A job
that ends without running (expired, cancelled while it waited) is started just to be given its log
and its finish; one refused before admission (signature, translation, policy) is started at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from runner import __version__, exitcodes
from runner.config import BuildkiteConfig, GithubConfig
from runner.identity import identity_from_json
from runner.job import OUTPUTS_DIR, JobRecord, JobState
from runner.logging_setup import get_logger
from runner.logs.redact import secret_values
from runner.logs.tail import pump
from runner.metrics import signature_rejected
from runner.secrets import read_secret_file
from runner.sources import Admission, Ended, JobHost
from runner.sources.buildkite import protocol
from runner.sources.buildkite.artifacts import Uploader
from runner.sources.buildkite.checkout import CheckoutFailed, CommitNotOnRef, checkout
from runner.sources.buildkite.client import AgentSession, ApiError
from runner.sources.buildkite.confirm import NotConfirmed, confirm_pull_request, pull_request_claim
from runner.sources.buildkite.intake import finishing_part, job_problem
from runner.sources.buildkite.protocol import FinishReport, RetryPolicy
from runner.sources.buildkite.report import LogSettings, LogStreamer
from runner.sources.buildkite.signature import Jwks, SignatureRejected, verify_step_signature
from runner.sources.buildkite.signature_keys import read_verification_jwks
from runner.sources.buildkite.state import AcceptedJob, BuildkiteState, JobMemory
from runner.sources.buildkite.translate import JobRefused, Translated, translate
from runner.sources.checkout_failure import end_failed_checkout
from runner.sources.github.client import GitHubClient, GitHubError
from runner.sources.github.repository_urls import github_web_host
from runner.tasks import TaskSet, pause

log = get_logger("runner.sources.buildkite")

WALLTIME_EXIT_STATUS = 124
# How often a job not yet started at Buildkite looks whether its runner job runs, besides hearing
# of it: the end of a job that ended while no agent watched is not announced.
START_LOOK_S = 1.0
REJECTED_HEADER = "+++ ⛔ Job signature verification failed\n"
# A session that ends with an exception is started again after RESTART_BACKOFF_S, doubling with
# each death in a row up to MAX_RESTART_BACKOFF_S; a session that lived HEALTHY_SESSION_S was
# not part of a run of deaths.
RESTART_BACKOFF_S = 5.0
MAX_RESTART_BACKOFF_S = 300.0
HEALTHY_SESSION_S = 600.0


@dataclass(frozen=True)
class NotRun:
    """A job that ends before it is admitted: the log's last line and Buildkite's signal_reason."""

    line: str
    signal_reason: str


def finish_report(ended: Ended, cancel_reason: str | None, chunks_failed: int) -> FinishReport:
    """Buildkite's view of how a runner job ended (see the table in the module docstring)."""
    state = ended.state
    if state == JobState.succeeded:
        return FinishReport(0, chunks_failed_count=chunks_failed)
    if state == JobState.failed and ended.exit_status is not None:
        return FinishReport(ended.exit_status, chunks_failed_count=chunks_failed)
    if state == JobState.cancelled:
        return FinishReport(protocol.NOT_RUN, "SIGTERM", cancel_reason or "cancel", chunks_failed)
    if state == JobState.timed_out:
        return FinishReport(WALLTIME_EXIT_STATUS, chunks_failed_count=chunks_failed)
    if state == JobState.expired:
        return FinishReport(exitcodes.EXPIRED, chunks_failed_count=chunks_failed)
    if state == JobState.denied:
        return FinishReport(protocol.NOT_RUN, None, "agent_refused", chunks_failed)
    return FinishReport(protocol.NOT_RUN, None, "process_run_error", chunks_failed)


def restart_delay(base_s: float, streak: int) -> float:
    """Seconds to wait before starting a session again after the `streak`-th death in a row."""
    return min(MAX_RESTART_BACKOFF_S, base_s * 2.0 ** min(max(streak - 1, 0), 32))


def death_streak(streak: int, lived_s: float) -> int:
    """The run of deaths once a session that lived `lived_s` seconds has died."""
    return 1 if lived_s >= HEALTHY_SESSION_S else streak + 1


def load_trust(config: BuildkiteConfig) -> tuple[str, Jwks | None]:
    """The registration token and the verification keys; raises on a missing or open file."""
    token = read_secret_file(config.token_file, what="Buildkite agent token")
    jwks = None
    if config.verification_jwks_file is not None:
        jwks = read_verification_jwks(config.verification_jwks_file)
    return token, jwks


class BuildkiteSource:
    """Serves `config.workers` agent sessions for the agent `host` until it drains."""

    def __init__(self, config: BuildkiteConfig, host: JobHost, state: BuildkiteState, *,
                 policies: Mapping[str, RetryPolicy] = protocol.DEFAULT_POLICIES,
                 http_timeout_s: float = 60.0, redacted_vars: tuple[str, ...] = (),
                 github: GithubConfig | None = None, restart_backoff_s: float = RESTART_BACKOFF_S) -> None:
        self.config = config
        self._restart_backoff_s = restart_backoff_s
        # With a GitHub App, pull request builds of its GitHub's repositories are confirmed there.
        self._github_config = github
        self._github: GitHubClient | None = None
        self.host = host
        self.memory = JobMemory(state)
        self._policies = policies
        self._timeout = http_timeout_s
        self._redacted_vars = (*config.redacted_vars, *redacted_vars)
        self._jwks: Jwks | None = None
        self._token = ""
        self._http: aiohttp.ClientSession | None = None
        self._jobs = TaskSet()   # the jobs resumed after a restart
        self.stopped = asyncio.Event()

    def load_trust(self) -> None:
        self._token, self._jwks = load_trust(self.config)

    async def serve(self) -> None:
        if not self._token:
            self.load_trust()
        # No automatic decompression: chunk bodies are gzip we made, answers are small JSON.
        connector = aiohttp.TCPConnector(limit=max(10, 4 * self.config.workers))
        self._http = aiohttp.ClientSession(connector=connector)
        if self._github_config is not None:
            self._github = GitHubClient.from_config(self._github_config, self._http)
        try:
            for state in self.memory.open_jobs():
                self._jobs.spawn(self._resume(state))
            workers = [asyncio.create_task(self._keep_serving(i)) for i in range(self.config.workers)]
            await asyncio.gather(*workers, return_exceptions=True)
            await self._jobs.wait_idle()
        finally:
            await self._http.close()
            self.stopped.set()
            log.info("Buildkite source stopped")

    def _session(self) -> AgentSession:
        assert self._http is not None
        return AgentSession(self._http, self.config.endpoint, self._token, policies=self._policies,
                            timeout_s=self._timeout)

    # -- one agent session -------------------------------------------------------------------

    async def _keep_serving(self, index: int) -> None:
        """Worker `index`'s agent sessions, one after another until the agent drains. A session that
        ends with an exception (a bug, a header aiohttp refuses to send) is logged with its count
        and started again after a backoff, so jobs never silently stop being taken; one that ends
        by itself (told to disconnect, refused by Buildkite) ends the worker, as it did."""
        loop = asyncio.get_running_loop()
        deaths = streak = 0
        while not self.host.draining.is_set():
            began = loop.time()
            try:
                await self._worker(index)
                return
            except Exception as exc:
                deaths += 1
                streak = death_streak(streak, loop.time() - began)
                delay = restart_delay(self._restart_backoff_s, streak)
                log.exception("Buildkite agent session failed; it is restarted",
                              worker=self._agent_name(index), deaths=deaths, restart_in=round(delay, 3),
                              error=f"{type(exc).__name__}: {exc}")
            await pause(delay, self.host.draining)

    @staticmethod
    def _agent_name(index: int) -> str:
        return f"{socket.gethostname()}-hpc-runner-{index + 1}"

    async def _worker(self, index: int) -> None:
        session = self._session()
        name = self._agent_name(index)
        try:
            answer = await session.call(protocol.register(
                name=name, hostname=socket.gethostname(), tags=self.config.tags, version=__version__,
                pid=os.getpid()))
            registration = protocol.parse_register(answer.data)
        except (ApiError, protocol.ProtocolError) as exc:
            log.error("Buildkite agent could not register or connect", worker=name, error=str(exc))
            return
        session.session_token = registration.access_token
        session.adopt_headers(registration.request_headers, registration.refused_headers)
        if registration.endpoint:
            session.endpoint = registration.endpoint
        # Registered: whatever happens from here, the agent is disconnected, so that a session
        # started again does not leave this one behind in Buildkite.
        try:
            try:
                await session.call(protocol.connect())
            except (ApiError, protocol.ProtocolError) as exc:
                log.error("Buildkite agent could not register or connect", worker=name, error=str(exc))
                return
            log.info("Buildkite agent connected", worker=name, agent_id=registration.agent_id)
            lost = asyncio.Event()
            beat = asyncio.create_task(self._heartbeat(session, registration.heartbeat_interval, lost))
            try:
                await self._ping_loop(session, registration, lost)
            finally:
                beat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beat
        finally:
            try:
                await session.call(protocol.disconnect())
            except Exception as exc:   # the session's own ending is what matters
                log.warning("Buildkite agent could not disconnect", worker=name,
                            error=f"{type(exc).__name__}: {exc}")
            log.info("Buildkite agent disconnected", worker=name)

    async def _heartbeat(self, session: AgentSession, interval: int, lost: asyncio.Event) -> None:
        told = False   # of an unexpected failure: its traceback once per session, then one line each
        while True:
            await asyncio.sleep(interval)
            try:
                await session.call(protocol.heartbeat())
            except ApiError as exc:
                if exc.status is not None and protocol.classify(exc.status) is protocol.Verdict.give_up:
                    log.error("Buildkite refused a heartbeat; this agent session stops", error=str(exc))
                    lost.set()
                    return
                log.warning("heartbeat failed", error=str(exc))
            except Exception as exc:
                # Not a failure Buildkite's rules know (a bug, a header aiohttp refuses): the next
                # heartbeat is tried all the same, since a session without them is lost.
                log.warning("heartbeat failed", error=f"{type(exc).__name__}: {exc}", exc_info=not told)
                told = True

    async def _ping_loop(self, session: AgentSession, registration: protocol.Registration,
                         lost: asyncio.Event) -> None:
        interval = registration.ping_interval
        skip_interval = True  # the first ping waits only the jitter
        told = False          # of an unexpected failure, as in _heartbeat
        while not self.host.draining.is_set() and not lost.is_set():
            jitter = session.rng.uniform(0, interval)
            wait = jitter if skip_interval else interval + jitter
            await pause(wait, self.host.draining, lost)
            skip_interval = False
            if self.host.draining.is_set() or lost.is_set():
                return
            try:
                answer = await session.call(protocol.ping())
                ping = protocol.parse_ping(answer.data)
            except ApiError as exc:
                if exc.status is not None and protocol.classify(exc.status) is protocol.Verdict.give_up:
                    log.error("Buildkite refused a ping; this agent session stops", error=str(exc))
                    return
                log.warning("ping failed", error=str(exc))
                continue
            except protocol.ProtocolError as exc:
                log.warning("ping answer not understood", error=str(exc))
                continue
            except Exception as exc:
                # As a failed ping: the next one is tried.
                log.warning("ping failed", error=f"{type(exc).__name__}: {exc}", exc_info=not told)
                told = True
                continue
            session.adopt_headers(ping.request_headers, ping.refused_headers)
            if ping.message:
                log.info("message from Buildkite", message=ping.message)
            if ping.endpoint and ping.endpoint != session.endpoint:
                await self._switch_endpoint(session, ping.endpoint)
            if ping.action == "disconnect":
                log.info("Buildkite asked this agent to disconnect")
                return
            if ping.action == "pause" or not ping.dispatches:
                continue
            assert ping.job_id is not None
            ran = await self._take(session, ping.job_id, registration, lost)
            skip_interval = ran

    async def _switch_endpoint(self, session: AgentSession, endpoint: str) -> None:
        previous = session.endpoint
        session.endpoint = endpoint
        try:
            await session.call(protocol.ping())
            log.info("Buildkite endpoint changed", endpoint=endpoint)
        except Exception as exc:   # whatever the failure, the old endpoint stays
            session.endpoint = previous
            log.warning("Buildkite offered an endpoint that does not answer; keeping the old one",
                        endpoint=endpoint, error=str(exc))

    async def _take(self, session: AgentSession, bk_id: str, registration: protocol.Registration,
                    lost: asyncio.Event) -> bool:
        """Accept and run one job to its finish; whether it ran."""
        try:
            answer = await session.call(protocol.accept(bk_id))
        except ApiError as exc:
            log.warning("could not accept a Buildkite job", job=bk_id, error=str(exc))
            return False
        job = answer.data if isinstance(answer.data, dict) else {}
        # Bounded and typed before anything recursive (the state file's JSON, canonicalisation,
        # translation) sees the job; of a job out of bounds only what finishes it is kept.
        problem = job_problem(job)
        if problem is not None:
            job = finishing_part(job)
        state = AcceptedJob(bk_id=bk_id, job=job, token=str(job.get("token") or session.session_token),
                         request_headers=dict(session.request_headers),
                         job_status_interval=registration.job_status_interval)
        log.info("Buildkite job accepted", job=bk_id)
        await self._to_its_finish(session, state, self._begin(session, state, problem, lost))
        return True

    async def _begin(self, session: AgentSession, state: AcceptedJob, problem: str | None,
                     lost: asyncio.Event) -> None:
        self.memory.save(state)
        if problem is None:
            await self._process(session, state, lost=lost)
        elif await self._start(session, state):
            log.warning("Buildkite job refused as sent", job=state.bk_id, reason=problem)
            await self._refuse(session, state, f"hpc-runner: refused: {problem}\n", "agent_refused")

    async def _to_its_finish(self, session: AgentSession, state: AcceptedJob,
                             processing: Coroutine[Any, Any, None]) -> None:
        """Await a job's `processing`; whatever it raises (a bug included) ends the job in one finish
        (-1), and the session goes on with the next job. Cancellation goes through."""
        try:
            await processing
        except Exception as exc:
            log.exception("Buildkite job failed in the agent; it is finished as not run", job=state.bk_id)
            await self._finish_after_error(session, state, exc)

    async def _finish_after_error(self, session: AgentSession, state: AcceptedJob, error: Exception) -> None:
        if state.finish_sent:
            return  # the finish is out (or was going out when the error came): it stays the only one
        why = (f"hpc-runner: the agent failed while handling this job ({type(error).__name__}); "
               "it was stopped there, and the agent's log has the details\n")
        try:
            if state.runner_id is not None:
                # Its log was being streamed: the line joins the runner job's log, sent from where
                # the stream stopped, and the runner job ends (if it had not) as failed. Buildkite
                # hears -1 even if the command ended well: what it was told of the job is incomplete.
                detail = f"the agent failed while handling it: {type(error).__name__}"
                self.host.note(state.runner_id, why)
                self.host.fail(state.runner_id, detail)
                await self._report_runner_end(session, state, Ended(JobState.infra_failed, None, detail))
            elif await self._start(session, state):
                await self._refuse(session, state, why, "process_run_error")
        except Exception as again:
            log.error("the Buildkite job could not be reported after that failure", job=state.bk_id,
                      error=f"{type(again).__name__}: {again}")
            if not state.finish_sent and state.started:
                # Without its last lines, but finished.
                state.report = FinishReport(protocol.NOT_RUN, None, "process_run_error",
                                            state.checkpoint.chunks_failed)
                try:
                    await self._finish(session, state)
                except Exception as last:
                    log.error("the Buildkite job could not be finished", job=state.bk_id,
                              error=f"{type(last).__name__}: {last}")

    # -- one job -------------------------------------------------------------------------------

    async def _resume(self, state: AcceptedJob) -> None:
        session = self._session()
        session.adopt_headers(state.request_headers)
        log.info("carrying on with a Buildkite job after a restart", job=state.bk_id, phase=state.phase)
        await self._to_its_finish(session, state, self._process(session, state, resumed=True))

    async def _process(self, session: AgentSession, state: AcceptedJob, *, resumed: bool = False,
                       lost: asyncio.Event | None = None) -> None:
        """Take a job from where its state says to its finish. `lost` is set when Buildkite refuses
        the session's heartbeat: the agent is then gone for Buildkite, and its job is cancelled."""
        if state.phase == "finishing":
            await self._finish(session, state)
            return
        if state.phase == "accepted":
            # Not started yet: Buildkite's job starts when the runner job runs (see the module
            # docstring); `_refuse` and `_report_runner_end` start it to say why it will not.
            verdict = self._verify(state)
            if isinstance(verdict, str):
                signature_rejected()
                await self._refuse(session, state, verdict, "signature_rejected")
                return
            signer, fields, lines = verdict
            try:
                translated = translate(state.job, signer=signer, signed_fields=fields,
                                       policy_images=sorted(self.host.policy.images))
            except JobRefused as exc:
                await self._refuse(session, state, lines + f"hpc-runner: refused: {exc.reason}\n",
                                   "agent_refused")
                return
            notes = "".join(f"hpc-runner: {note}\n" for note in translated.notes)
            confirmed = await self._confirm_pull_request(state, translated)
            if isinstance(confirmed, NotRun):
                await self._refuse(session, state, lines + notes + confirmed.line, confirmed.signal_reason)
                return
            translated, confirmation = confirmed
            admission = Admission("buildkite", state.bk_id, translated.identity, translated.spec,
                                  log_preamble=lines + notes + confirmation,
                                  source_url=job_page(state.env, state.bk_id))
            admitted = await self.host.admit(admission)
            state.runner_id = admitted.job_id
            state.phase = "admitted"
            self.memory.save(state)
            if not admitted.decision.allowed:
                await self._report_runner_end(session, state, Ended(JobState.denied, None, None))
                return
            failed = await self._checkout(state, translated.repository, translated.commit, admitted.workspace)
            if failed is not None:
                return await self._report_runner_end(session, state, failed)
            await self._run(session, state, resumed=False, lost=lost)
            return
        record = self.host.job(state.runner_id or "")
        if record is not None and record.state == JobState.queued:
            # Admitted, but the agent stopped before the job was submitted (during its checkout).
            env = state.env
            workspace = Path(str((record.decision or {}).get("workspace", "")))
            failed = await self._checkout(state, env.get("BUILDKITE_REPO", ""),
                                          env.get("BUILDKITE_COMMIT", ""), workspace)
            if failed is not None:
                return await self._report_runner_end(session, state, failed)
            await self._run(session, state, resumed=False, lost=lost)
            return
        await self._run(session, state, resumed=resumed, lost=lost)

    async def _confirm_pull_request(self, state: AcceptedJob, translated: Translated
                                    ) -> tuple[Translated, str] | NotRun:
        """With a GitHub App, a pull request build of its GitHub's repositories is confirmed there:
        the translation with the confirmed head as its commit, and the log's line about it ("" when
        there is nothing to confirm); or how the job ends without running."""
        if self._github is None:
            return translated, ""
        claim = pull_request_claim(state.env, translated.identity, github_web_host(self._github.api_url))
        if claim is None:
            return translated, ""
        try:
            head = await confirm_pull_request(self._github, claim)
        except NotConfirmed as exc:
            log.warning("Buildkite pull request not confirmed by GitHub", job=state.bk_id, reason=exc.reason)
            return NotRun(f"hpc-runner: refused: {exc.reason}\n", "agent_refused")
        except GitHubError as exc:
            # GitHub could not be asked: no refusal, but nothing runs unconfirmed either.
            log.warning("could not ask GitHub about a Buildkite pull request", job=state.bk_id,
                        error=str(exc))
            return NotRun(f"hpc-runner: pull request #{claim.number} of {claim.repository} could not be "
                          f"confirmed through GitHub: {exc}\n", "process_run_error")
        fork = "from a fork" if translated.identity.fork else "not from a fork"
        return (replace(translated, commit=head), f"hpc-runner: GitHub confirms pull request #{claim.number} "
                f"of {claim.repository}: head {head}, {fork}\n")

    def _verify(self, state: AcceptedJob) -> tuple[str | None, list[str], str] | str:
        """(signer, signed fields, log lines) of a trusted job, or the log text of a rejection."""
        job = state.job
        raw_step = job.get("step")
        step: dict[str, Any] = raw_step if isinstance(raw_step, dict) else {}
        env = state.env
        signature = step.get("signature")
        if self._jwks is None:
            note = ("hpc-runner: this agent has no verification keys (allow_unsigned): "
                    "the job's signature is not checked\n")
            return None, [], note
        try:
            verified = verify_step_signature(
                signature if isinstance(signature, dict) else None, job_env=env, step=step,
                repository_url=env.get("BUILDKITE_REPO", ""), jwks=self._jwks,
                matrix_permutation=job.get("matrix_permutation") or {})
        except SignatureRejected as exc:
            log.warning("Buildkite job signature rejected", job=state.bk_id, reason=exc.reason)
            shown = (f"signature: {signature.get('value')}\n" if isinstance(signature, dict)
                     else "no signature in job\n")
            return REJECTED_HEADER + f"error: {exc.reason}\n" + shown
        assert isinstance(signature, dict)
        fields = [str(f) for f in signature.get("signed_fields", [])]
        lines = f"~~~ ✅ Job signature verified (key {verified.kid}, {verified.alg})\n"
        return verified.kid, fields, lines

    async def _start(self, session: AgentSession, state: AcceptedJob) -> bool:
        if state.started:
            return True
        try:
            await session.call(protocol.start(state.bk_id), job_token=state.token)
        except ApiError as exc:
            # A retried start whose first try arrived is answered 422 (the job already runs).
            if not (exc.status == 422 and exc.attempts > 1):
                # Buildkite will not let it start (finished, cancelled): nothing to run or report.
                log.warning("Buildkite did not let the job start", job=state.bk_id, error=str(exc))
                self.memory.close(state)
                return False
        state.started = True
        self.memory.save(state)
        return True

    def _secrets(self, state: AcceptedJob) -> list[str]:
        found = secret_values(state.env, self._redacted_vars)
        return [*found, state.token]

    def _streamer(self, session: AgentSession, state: AcceptedJob, *, durable: bool) -> LogStreamer:
        settings = LogSettings.from_job(state.job)
        if durable:
            return LogStreamer(session, state.bk_id, state.token, settings, secrets=self._secrets(state),
                               outbox=self.memory.outbox(state), checkpoint=state.checkpoint,
                               staged=self.memory.staged(state))
        return LogStreamer(session, state.bk_id, state.token, settings, secrets=self._secrets(state))

    async def _refuse(self, session: AgentSession, state: AcceptedJob, text: str, reason: str) -> None:
        """A job that never becomes a runner job: its log is these lines, its status -1."""
        if not await self._start(session, state):
            return
        streamer = self._streamer(session, state, durable=False)
        streamer.start()
        await streamer.write(text.encode())
        failed = await streamer.close()
        state.report = FinishReport(protocol.NOT_RUN, None, reason, failed)
        state.phase = "finishing"
        self.memory.save(state)
        await self._finish(session, state)

    async def _checkout(self, state: AcceptedJob, repository: str, commit: str,
                        workspace: Path) -> Ended | None:
        """Check the job's commit out; None when done, else how the job ended (it never runs)."""
        assert state.runner_id is not None
        record = self.host.job(state.runner_id)
        assert record is not None
        # The ref the policy decided on (a branch, a pull request's head): the commit must be on it;
        # a tag's must be the tag's commit.
        claimed = identity_from_json(record.identity).effective_ref
        self.host.note(state.runner_id, f"--- :git: hpc-runner: checking out {commit or 'HEAD'}\n")
        try:
            await checkout(repository, commit, workspace, ref=claimed)
        except CheckoutFailed as exc:
            refused = isinstance(exc, CommitNotOnRef)
            ended = end_failed_checkout(self.host, state.runner_id, exc, refused=refused)
            # Not a failure of git: the job is not what it claims, so Buildkite hears agent_refused.
            return Ended(JobState.denied, None, str(exc)) if refused else ended
        return None

    async def _run(self, session: AgentSession, state: AcceptedJob, *, resumed: bool,
                   lost: asyncio.Event | None = None) -> None:
        """Run (or follow again) the admitted runner job with its log streamed, then finish."""
        assert state.runner_id is not None
        streamer = self._streamer(session, state, durable=True)
        cancel = asyncio.Event()
        reason: list[str] = []
        runs = asyncio.Event()      # the runner job runs, or ended: Buildkite's job may start
        opened: list[bool] = []     # [True]: started, the log goes out; [False]: Buildkite refused

        def heard(record: JobRecord) -> None:
            if record.state == JobState.running or record.state.is_terminal:
                runs.set()

        async def open_stream() -> bool:
            if not opened:
                opened.append(await self._start_when_it_runs(session, state, runs, reason, cancel))
                if opened[0]:
                    streamer.start()
            return opened[0]

        async def sink(offset: int, data: bytes) -> None:
            # Held until Buildkite's job has started: the first chunks are what was said meanwhile.
            if await open_stream():
                await streamer.sink(offset, data)

        watcher = asyncio.create_task(self._watch(session, state, cancel, reason, lost))
        try:
            runner = self.host.resume if resumed else self.host.run
            # The log from where the last stream's checkpoint stopped: nothing twice, nothing lost.
            ended = await runner(state.runner_id, sink=sink, cancel=cancel,
                                 offset=state.checkpoint.file_offset, on_change=heard)
            if not await open_stream():  # Buildkite would not let it start: nothing to report
                await streamer.abandon()
                return
        except BaseException:
            # Cancelled, or failed: this stream stops here (the next one carries on from its
            # checkpoint), so none of its tasks goes on sending.
            await streamer.abandon()
            raise
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if ended.outputs:
            await self._upload_outputs(session, state, ended, streamer)
        failed = await streamer.close()
        if not reason and self.host.stopping.is_set() and ended.state == JobState.cancelled:
            reason.append("agent_stop")
        await self._conclude(session, state, finish_report(ended, reason[0] if reason else None, failed))

    async def _start_when_it_runs(self, session: AgentSession, state: AcceptedJob, runs: asyncio.Event,
                                  reason: list[str], cancel: asyncio.Event) -> bool:
        """Wait until the runner job runs (or ended), then start Buildkite's job; False when
        Buildkite will not let it start (the runner job is then cancelled: nobody would hear of it).
        A job cancelled in Buildkite before it started is not started: Buildkite takes the log and
        the finish of a job it is cancelling as they are."""
        assert state.runner_id is not None
        while not state.started and not runs.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(runs.wait(), START_LOOK_S)
            # A host that says nothing of the change (an end found after a restart): look.
            record = self.host.job(state.runner_id)
            if record is None or record.state == JobState.running or record.state.is_terminal:
                runs.set()
        if state.started or reason:
            return True
        try:
            await session.call(protocol.start(state.bk_id), job_token=state.token)
        except ApiError as exc:
            # A retried start whose first try arrived is answered 422 (the job already runs).
            if not (exc.status == 422 and exc.attempts > 1):
                return await self._not_started(session, state, exc, reason, cancel)
        state.started = True
        self.memory.save(state)
        log.info("Buildkite job started: the runner job runs", job=state.bk_id)
        return True

    async def _not_started(self, session: AgentSession, state: AcceptedJob, refusal: ApiError,
                           reason: list[str], cancel: asyncio.Event) -> bool:
        """Buildkite refused the start of a job whose runner job runs: cancelled (or timed out)
        there meanwhile, it is cancelled here and still given its log and finish (True); otherwise
        Buildkite is done with it and nothing is reported (False)."""
        try:
            answer = await session.call(protocol.job_state(state.bk_id), job_token=state.token)
            action = protocol.job_state_action(answer.data)
        except ApiError:
            action = None
        if action is not None:
            why = "the job was cancelled in Buildkite" if action == "cancel" \
                else "the job reached its Buildkite timeout"
            self._cancel(state, cancel, reason, why)
            return True
        log.warning("Buildkite did not let the job start", job=state.bk_id, error=str(refusal))
        self.memory.close(state)
        cancel.set()
        return False

    async def _upload_outputs(self, session: AgentSession, state: AcceptedJob, ended: Ended,
                              streamer: LogStreamer) -> None:
        """The job's collected outputs as its artifacts, after its command and before its finish, as
        buildkite-agent uploads artifact_paths; what could not be uploaded is said in its log. The
        lines go to Buildkite's log only: the job's own log ended with its record."""
        assert state.runner_id is not None
        record = self.host.job(state.runner_id)
        if record is None or not record.log_path:
            return
        # The job's directory holds its log and the outputs collected from its workspace.
        root = Path(record.log_path).parent / OUTPUTS_DIR
        patterns = [p for p in record.spec.get("outputs") or [] if isinstance(p, str)]
        await streamer.write(b"~~~ Uploading artifacts\n")
        if self.host.stopping.is_set():
            # Cancelled by the agent's second SIGTERM: the finish comes first, whatever the uploads
            # would take.
            await streamer.write(b"hpc-runner: artifacts not uploaded: the agent is stopping\n")
            return
        results = await Uploader(session, state.bk_id, state.token).upload(ended.outputs, root, patterns)
        uploaded = sum(1 for r in results if r.state == "finished")
        lines = "".join(r.line or "" for r in results)
        summary = f"hpc-runner: {uploaded} of {len(results)} artifact(s) uploaded\n"
        await streamer.write((lines + summary).encode())

    async def _report_runner_end(self, session: AgentSession, state: AcceptedJob,
                                 ended: Ended | None) -> None:
        """A runner job that ended without running (denied, checkout failed): send its log, finish."""
        assert state.runner_id is not None
        if not await self._start(session, state):
            return
        record = self.host.job(state.runner_id)
        assert record is not None
        if ended is None:
            ended = Ended(record.state, record.exit_status, record.outcome_detail)
        streamer = self._streamer(session, state, durable=True)
        streamer.start()
        await pump(Path(record.log_path or ""), offset=state.checkpoint.file_offset, done=lambda: True,
                   sink=streamer.sink)
        failed = await streamer.close()
        await self._conclude(session, state, finish_report(ended, None, failed))

    async def _conclude(self, session: AgentSession, state: AcceptedJob, report: FinishReport) -> None:
        state.report = report
        state.phase = "finishing"
        self.memory.save(state)
        await self._finish(session, state)

    async def _finish(self, session: AgentSession, state: AcceptedJob) -> None:
        """Send finish once: an 'already finished' answer to a repeated finish counts as done."""
        assert state.report is not None
        repeated = state.finish_sent
        state.finish_sent = True
        self.memory.save(state)
        try:
            await session.call(protocol.finish(state.bk_id, state.report), job_token=state.token)
            log.info("Buildkite job finished", job=state.bk_id, exit_status=state.report.exit_status,
                     signal_reason=state.report.signal_reason)
        except ApiError as exc:
            # A retried (or resent) finish that Buildkite had already recorded is answered 422.
            if exc.status == 422 and (exc.attempts > 1 or repeated or "already" in exc.message.lower()):
                log.info("Buildkite had already recorded the job's finish", job=state.bk_id)
            else:
                log.error("Buildkite did not accept the job's finish", job=state.bk_id, error=str(exc))
        self.memory.close(state)

    async def _watch(self, session: AgentSession, state: AcceptedJob, cancel: asyncio.Event,
                     reason: list[str], lost: asyncio.Event | None = None) -> None:
        """Poll the job's state; cancellation in Buildkite (or a revoked job token) cancels it,
        and so does the loss of the agent's session (as the agent's ungraceful stop does). A poll
        that raises is followed by the next: the job's outcome is its own."""
        told = False   # of an unexpected failure: its traceback once per job, then one line each
        while not cancel.is_set():
            delay = protocol.jittered(state.job_status_interval, session.rng)
            if lost is None:
                await asyncio.sleep(delay)
            else:
                await pause(delay, lost)
                if lost.is_set():
                    self._cancel(state, cancel, reason, "Buildkite refused this agent's heartbeat",
                                 signal_reason="agent_stop")
                    return
            try:
                answer = await session.call(protocol.job_state(state.bk_id), job_token=state.token)
            except ApiError as exc:
                if exc.status == 401:
                    self._cancel(state, cancel, reason, "Buildkite no longer accepts the job's token")
                    return
                continue
            except Exception as exc:
                # Not a failure Buildkite's rules know (a bug, a request aiohttp refuses to send):
                # as a failed poll, since the next one may still bring the job's cancellation.
                log.warning("Buildkite job-state poll failed", job=state.bk_id,
                            error=f"{type(exc).__name__}: {exc}", exc_info=not told)
                told = True
                continue
            action = protocol.job_state_action(answer.data)
            if action == "cancel":
                self._cancel(state, cancel, reason, "the job was cancelled in Buildkite")
            elif action == "timeout":
                self._cancel(state, cancel, reason, "the job reached its Buildkite timeout")

    def _cancel(self, state: AcceptedJob, cancel: asyncio.Event, reason: list[str], why: str, *,
                signal_reason: str = "cancel") -> None:
        log.info("cancelling a Buildkite job", job=state.bk_id, why=why)
        if state.runner_id is not None:
            with contextlib.suppress(OSError):
                self.host.note(state.runner_id, f"hpc-runner: {why}; cancelling\n")
        reason.append(signal_reason)
        cancel.set()


def job_page(env: Mapping[str, str], bk_id: str) -> str | None:
    """The Buildkite job's own page: its build's page (`BUILDKITE_BUILD_URL` of the accept answer)
    scrolled to the job, as Buildkite links to a job; None when the build's URL is not http(s)."""
    build_url = env.get("BUILDKITE_BUILD_URL", "")
    if not build_url.startswith(("https://", "http://")) or any(c.isspace() for c in build_url):
        return None
    return f"{build_url.split('#', 1)[0]}#{bk_id}"
