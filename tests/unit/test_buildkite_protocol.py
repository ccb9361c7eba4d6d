"""The Buildkite agent protocol as data, the HTTP client's retry classes against the emulator,
and the translation of a job into identity, job spec and env."""

from __future__ import annotations

import json
import random
import time

import aiohttp
import pytest
from fakes.buildkite_api import BuildkiteEmulator, make_job

from runner.sources.buildkite import protocol
from runner.sources.buildkite.checkout import without_credentials
from runner.sources.buildkite.chunks import Chunk
from runner.sources.buildkite.client import AgentSession, ApiError
from runner.sources.buildkite.protocol import RetryPolicy, Verdict, classify, next_delay
from runner.sources.buildkite.translate import (
    JobRefused,
    hpc_runner_block,
    identity,
    job_env,
    plugin_name,
    translate,
)

# -- retry classes -----------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "decodable", "verdict"), [
    (None, True, Verdict.retry), (200, True, Verdict.ok), (201, False, Verdict.retry),
    (429, True, Verdict.retry), (500, True, Verdict.retry), (503, True, Verdict.retry),
    (400, True, Verdict.give_up), (401, True, Verdict.give_up), (422, True, Verdict.give_up),
])
def test_buildkites_retry_classes(status: int | None, decodable: bool, verdict: Verdict) -> None:
    assert classify(status, decodable=decodable) is verdict


def test_next_delay_follows_each_endpoints_policy() -> None:
    rng = random.Random(1)
    policies = protocol.DEFAULT_POLICIES
    assert next_delay(policies["register"], 1, 500, rng=rng) == 10
    assert next_delay(policies["register"], 30, 500, rng=rng) is None
    assert next_delay(policies["register"], 1, 403, rng=rng) is None
    # connect retries every failure, accept only network errors.
    assert next_delay(policies["connect"], 1, 404, rng=rng) == 5
    assert next_delay(policies["accept"], 1, None, rng=rng) == 5
    assert next_delay(policies["accept"], 1, 500, rng=rng) is None
    # start backs off exponentially, 1, 2, 4 ... seconds.
    assert [next_delay(policies["start"], n, 502, rng=rng) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    # 429 waits what Retry-After says (capped), else the policy's delay.
    assert next_delay(policies["chunks"], 1, 429, retry_after="7", rng=rng) == 7
    assert next_delay(policies["chunks"], 1, 429, retry_after="99999", rng=rng) == 300
    first = next_delay(policies["finish"], 1, 500, rng=rng)
    assert first is not None and 2.0 <= first < 3.0
    assert next_delay(policies["finish"], 12, 500, rng=rng) is None


def test_a_scaled_policy_waits_proportionally() -> None:
    policy = RetryPolicy(3, protocol.constant(10)).scaled(0.01)
    assert next_delay(policy, 1, 500) == pytest.approx(0.1)


# -- requests and answers ----------------------------------------------------------------------


def test_requests_use_the_right_token_path_and_body() -> None:
    assert protocol.register(name="n", hostname="h", tags=("queue=hpc",), version="1", pid=7).token \
        == "registration"
    assert {protocol.connect().token, protocol.ping().token, protocol.accept("j").token,
            protocol.disconnect().token, protocol.heartbeat().token} == {"session"}
    finish = protocol.finish("a.b", protocol.FinishReport(-1, "SIGTERM", "cancel", 2))
    assert (finish.token, finish.method, finish.path) == ("job", "PUT", "jobs/a%2Eb/finish")
    body = json.loads(finish.encoded_body() or b"")
    assert (body["exit_status"], body["chunks_failed_count"], body["signal_reason"]) == ("-1", 2, "cancel")
    assert "signal" not in json.loads(protocol.finish("j", protocol.FinishReport(0)).encoded_body() or b"")
    chunk = protocol.chunk("j", Chunk(3, 100, 5, b"gz"))
    assert chunk.query == {"sequence": "3", "offset": "100", "size": "5"}
    assert chunk.content_headers()["Content-Encoding"] == "gzip"
    with pytest.raises(ValueError, match="signal_reason"):
        protocol.FinishReport(-1, None, "not-a-reason")


def test_answers_keep_only_buildkite_headers_and_refuse_zero_intervals() -> None:
    answer = {"id": "a", "name": "n", "access_token": "bkaa_x", "ping_interval": 2, "job_status_interval": 1,
              "heartbeat_interval": 5, "request_headers": {"Buildkite-A": "1", "X-B": "2"}}
    assert protocol.parse_register(answer).request_headers == {"Buildkite-A": "1"}
    with pytest.raises(protocol.ProtocolError, match="ping_interval"):
        protocol.parse_register({**answer, "ping_interval": 0})
    assert protocol.parse_ping({"action": "idle"}).request_headers is None
    assert protocol.parse_ping({"request_headers": {}}).request_headers == {}
    paused = protocol.parse_ping({"action": "pause", "job": {"id": "j"}})
    assert paused.job_id == "j" and not paused.dispatches
    assert protocol.job_state_action({"state": "canceling"}) == "cancel"
    assert protocol.job_state_action({"state": "timing_out"}) == "timeout"
    assert protocol.job_state_action({"state": "running"}) is None


def test_headers_that_no_request_may_carry_are_left_out_and_named() -> None:
    asked = {"Buildkite-A": "1", "Buildkite-Tab": "a\tb", "Buildkite-Utf": "grüße",
             "Buildkite-Lf": "a\nX-Injected: 1", "Buildkite-Cr": "a\rb", "Buildkite-Nul": "a\x00b",
             "Buildkite-Del": "a\x7fb", "Buildkite-Esc": "\x1b[31m", "Buildkite-Lone": "a\ud800b",
             "Buildkite-Bad Name": "1", "Buildkite-Colon:": "1", "X-Other": "a\nb"}
    answer = {"id": "a", "name": "n", "access_token": "bkaa_x", "ping_interval": 2, "job_status_interval": 1,
              "heartbeat_interval": 5, "request_headers": asked}
    kept = {"Buildkite-A": "1", "Buildkite-Tab": "a\tb", "Buildkite-Utf": "grüße"}
    refused = {"Buildkite-Lf", "Buildkite-Cr", "Buildkite-Nul", "Buildkite-Del", "Buildkite-Esc",
               "Buildkite-Lone", "Buildkite-Bad Name", "Buildkite-Colon:"}
    registration = protocol.parse_register(answer)
    ping = protocol.parse_ping({"request_headers": asked})
    for parsed in (registration, ping):
        assert parsed.request_headers == kept
        assert set(parsed.refused_headers) == refused
    assert "control character" in registration.refused_headers["Buildkite-Lf"]
    assert "name" in registration.refused_headers["Buildkite-Bad Name"]
    assert protocol.parse_ping({"action": "idle"}).refused_headers == {}


# -- the client against the emulator -----------------------------------------------------------


# The emulator (`bk`) and the client's session (`http`) come from conftest.

FAST = {name: policy.scaled(0.001) for name, policy in protocol.DEFAULT_POLICIES.items()}


async def registered(bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> AgentSession:
    session = AgentSession(http, bk.url, bk.registration_token, policies=FAST, timeout_s=2)
    answer = await session.call(protocol.register(name="t", hostname="h", tags=("queue=hpc",), version="1",
                                                  pid=1))
    reg = protocol.parse_register(answer.data)
    session.session_token = reg.access_token
    session.adopt_headers(reg.request_headers)
    await session.call(protocol.connect())
    return session


@pytest.mark.parametrize("fault", ["500", "429", "non_json", "too_deep", "drop"])
async def test_retryable_failures_are_retried(fault: str, bk: BuildkiteEmulator,
                                              http: aiohttp.ClientSession) -> None:
    session = await registered(bk, http)
    if fault == "500":
        bk.fail("heartbeat", 500, times=3)
    elif fault == "429":
        bk.fail("heartbeat", 429, times=1, retry_after=1)
    elif fault == "non_json":
        bk.non_json("heartbeat", times=2)
    elif fault == "too_deep":
        # JSON, but nested deeper than Python's json can read (RecursionError, not ValueError).
        bk.non_json("heartbeat", times=2, body="[" * 100_000 + "]" * 100_000)
    else:
        bk.drop("heartbeat", times=2)
    started = time.monotonic()
    answer = await session.call(protocol.heartbeat())
    assert answer.status == 200 and "received_at" in answer.data
    if fault == "429":
        # Retry-After (1 s, capped at the scaled policy's 0.3 s) rules over its 0.005 s delay.
        assert time.monotonic() - started >= 0.25
    assert bk.pending_faults("heartbeat") == 0
    assert bk.header_violations() == []


async def test_a_4xx_is_not_retried_and_accept_retries_only_network_errors(
        bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    session = await registered(bk, http)
    bk.fail("heartbeat", 403, times=2)
    with pytest.raises(ApiError) as refused:
        await session.call(protocol.heartbeat())
    assert (refused.value.status, refused.value.attempts) == (403, 1)
    job_id = bk.queue_job(make_job("echo"), agent_query_rules=["queue=hpc"])
    ping = protocol.parse_ping((await session.call(protocol.ping())).data)
    assert ping.job_id == job_id
    bk.fail("accept", 503)
    with pytest.raises(ApiError) as unavailable:
        await session.call(protocol.accept(job_id))
    assert unavailable.value.attempts == 1
    # aiohttp itself sends an idempotent PUT once more after a dropped connection; our retry
    # covers the second drop.
    bk.drop("accept", times=2)
    answer = await session.call(protocol.accept(job_id))
    assert answer.data["token"].startswith("bkaj_")
    assert len(bk.requests("accept")) == 4


async def test_job_calls_use_the_job_token_and_session_calls_refuse_it(
        bk: BuildkiteEmulator, http: aiohttp.ClientSession) -> None:
    session = await registered(bk, http)
    job_id = bk.queue_job(make_job("echo"), agent_query_rules=["queue=hpc"])
    await session.call(protocol.ping())
    job = (await session.call(protocol.accept(job_id))).data
    await session.call(protocol.start(job_id), job_token=job["token"])
    with pytest.raises(ApiError) as wrong:
        await session.call(protocol.job_state(job_id))  # without the job token: the session token
    assert wrong.value.status == 401
    assert [r.token_kind for r in bk.requests("start")] == ["job"]


# -- translation -------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["hpc-runner#v1", "hpc-runner", "org/hpc-runner#v1",
                                    "github.com/buildkite-plugins/hpc-runner-buildkite-plugin#v1.2",
                                    "https://git.example.org/ci/hpc-runner-buildkite-plugin.git#main",
                                    "git@github.com:org/hpc-runner-buildkite-plugin.git#v1"])
def test_the_plugin_is_found_in_any_source_form(source: str) -> None:
    assert plugin_name(source) == "hpc-runner"
    block, others = hpc_runner_block(json.dumps([{source: {"image": "x"}}, {"docker#v5": {}}]))
    assert block == {"image": "x"} and others == ["docker#v5"]


def test_two_plugin_blocks_are_refused() -> None:
    with pytest.raises(JobRefused, match="2 times"):
        hpc_runner_block(json.dumps([{"hpc-runner#v1": {}}, {"org/hpc-runner#v2": {}}]))


BASE_ENV = {"BUILDKITE_ORGANIZATION_SLUG": "clima", "BUILDKITE_PIPELINE_SLUG": "atmos",
            "BUILDKITE_BRANCH": "main", "BUILDKITE_REPO": "git@github.com:CliMA/Atmos.git",
            "BUILDKITE_BUILD_CREATOR_EMAIL": "a@example.org",
            "BUILDKITE_BUILD_CREATOR_TEAMS": "core:ci-admins", "BUILDKITE_PULL_REQUEST": "false",
            "BUILDKITE_SOURCE": "webhook"}


def test_identity_of_a_push_and_of_pull_requests_from_the_same_repository_and_a_fork() -> None:
    push, _ = identity(BASE_ENV, "key-1")
    assert push.to_json() == {"source": "buildkite", "organization": "clima", "pipeline": "atmos",
                              "branch": "main", "creator": "a@example.org", "signer": "key-1",
                              "event": "push", "teams": ["core", "ci-admins"], "fork": False}
    same = {**BASE_ENV, "BUILDKITE_PULL_REQUEST": "12",
            "BUILDKITE_PULL_REQUEST_REPO": "https://github.com/CliMA/Atmos"}
    pr, _ = identity(same, None)
    assert (pr.event, pr.ref, pr.fork) == ("pull_request", "refs/pull/12/head", False)
    fork, _ = identity({**same, "BUILDKITE_PULL_REQUEST_REPO": "https://github.com/mallory/Atmos.git"}, None)
    assert fork.fork
    unknown, _ = identity({**same, "BUILDKITE_PULL_REQUEST_REPO": ""}, None)
    assert unknown.fork
    scheduled, _ = identity({**BASE_ENV, "BUILDKITE_SOURCE": "schedule"}, None)
    assert scheduled.event == "schedule"


def test_identity_marks_as_signed_only_what_the_steps_signature_covers() -> None:
    # Nothing is signed: every field is Buildkite's word.
    assert identity(BASE_ENV, "key-1")[0].signed == ()
    # The step's signed env holds the branch and the pull request flag, the pipeline env the teams.
    step = {"env": {"BUILDKITE_BRANCH": "main", "BUILDKITE_PULL_REQUEST": "false"}}
    fields = ["command", "env", "env::BUILDKITE_BUILD_CREATOR_TEAMS", "matrix", "plugins", "repository_url"]
    job = {"env": {**BASE_ENV, "BUILDKITE_COMMAND": "make"}, "step": step}
    signed = translate(job, signer="key-1", signed_fields=fields, policy_images=["ci"]).identity
    assert signed.signed == ("ref", "pull_request", "teams")
    assert signed.to_json()["signed"] == ["ref", "pull_request", "teams"]
    # The same env without a verified signature (allow_unsigned) is not signed.
    assert translate(job, signer=None, signed_fields=[], policy_images=["ci"]).identity.signed == ()
    # A pull request: its ref and fork status need the head repository signed too.
    pr_env = {**BASE_ENV, "BUILDKITE_PULL_REQUEST": "12", "BUILDKITE_COMMIT": "0" * 40,
              "BUILDKITE_PULL_REQUEST_REPO": BASE_ENV["BUILDKITE_REPO"]}
    names = {"BUILDKITE_PULL_REQUEST", "BUILDKITE_COMMIT", "BUILDKITE_REPO"}
    assert identity(pr_env, "k", signed_env=names)[0].signed == ("ref", "commit", "event")
    every = names | {"BUILDKITE_PULL_REQUEST_REPO", "BUILDKITE_ORGANIZATION_SLUG", "BUILDKITE_PIPELINE_SLUG",
                     "BUILDKITE_BUILD_CREATOR_TEAMS"}
    assert identity(pr_env, "k", signed_env=every)[0].signed == (
        "pipeline", "ref", "commit", "event", "pull_request", "teams")
    # A push's ref is its branch, its event its BUILDKITE_SOURCE: both must be signed.
    push_names = {"BUILDKITE_PULL_REQUEST", "BUILDKITE_SOURCE"}
    assert identity(BASE_ENV, "k", signed_env=push_names)[0].signed == ("event", "pull_request")


def test_a_tag_builds_ref_is_its_tag_signed_only_with_the_tag() -> None:
    # Buildkite names a tag build's branch after the tag as well.
    tag_env = {**BASE_ENV, "BUILDKITE_TAG": "v1.0", "BUILDKITE_BRANCH": "v1.0"}
    tag, _ = identity(tag_env, "k")
    assert (tag.ref, tag.effective_ref, tag.event) == ("refs/tags/v1.0", "refs/tags/v1.0", "push")
    assert identity({**BASE_ENV, "BUILDKITE_TAG": ""}, "k")[0].effective_ref == "refs/heads/main"
    # The branch (the tag's name here) decides nothing: signing it does not sign the tag build's ref.
    branch_signed = frozenset({"BUILDKITE_BRANCH", "BUILDKITE_PULL_REQUEST"})
    assert "ref" not in identity(tag_env, "k", signed_env=branch_signed)[0].signed
    assert "ref" not in identity(tag_env, "k", signed_env=frozenset({"BUILDKITE_TAG"}))[0].signed
    tag_signed = frozenset({"BUILDKITE_TAG", "BUILDKITE_PULL_REQUEST"})
    assert identity(tag_env, "k", signed_env=tag_signed)[0].signed == ("ref", "pull_request")
    with pytest.raises(JobRefused, match=r"BUILDKITE_TAG is 'v1:refs/heads/main', not a git tag name"):
        identity({**tag_env, "BUILDKITE_TAG": "v1:refs/heads/main"}, "k")
    with pytest.raises(JobRefused, match=r"both a tag \(BUILDKITE_TAG v1.0\) and a pull request \(#12\)"):
        identity({**tag_env, "BUILDKITE_PULL_REQUEST": "12"}, "k")


def test_env_passes_buildkite_and_signed_variables_never_credentials() -> None:
    env = {**BASE_ENV, "BUILDKITE_AGENT_ACCESS_TOKEN": "bkaj_x", "STEP_VAR": "1", "PIPE_VAR": "2",
           "UNSIGNED": "3", "LD_PRELOAD": "/evil.so", "CI": "true"}
    passed, left_out = job_env(env, {"env": {"STEP_VAR": "1", "LD_PRELOAD": "/evil.so"}}, ["env::PIPE_VAR"])
    assert passed["STEP_VAR"] == "1" and passed["PIPE_VAR"] == "2" and passed["CI"] == "true"
    assert "BUILDKITE_PIPELINE_SLUG" in passed
    assert {"BUILDKITE_AGENT_ACCESS_TOKEN", "UNSIGNED", "LD_PRELOAD"} <= set(left_out)
    assert not set(left_out) & set(passed)


def test_translation_takes_the_block_and_the_steps_command() -> None:
    env = {**BASE_ENV, "BUILDKITE_COMMAND": "make test", "BUILDKITE_STEP_KEY": "unit tests",
           "BUILDKITE_PLUGINS": json.dumps([{"hpc-runner#v1": {"image": "ci", "resources": {"nodes": 2,
                                                                                            "tasks": 4}}}])}
    job = {"env": env, "step": {"command": "make test"}}
    result = translate(job, signer="k", signed_fields=[], policy_images=["ci", "other"])
    assert (result.spec.script, result.spec.image, result.spec.name) == ("make test", "ci", "unit-tests")
    assert (result.spec.resources.nodes, result.spec.resources.tasks) == (2, 4)
    assert result.repository == BASE_ENV["BUILDKITE_REPO"]
    no_block = {"env": {**env, "BUILDKITE_PLUGINS": ""}, "step": {}}
    assert translate(no_block, signer=None, signed_fields=[], policy_images=["only"]).spec.image == "only"
    with pytest.raises(JobRefused, match="must name the `image`"):
        translate(no_block, signer=None, signed_fields=[], policy_images=["a", "b"])
    both = {"env": {**env, "BUILDKITE_PLUGINS": json.dumps([{"hpc-runner": {"image": "ci", "script": "x"}}])},
            "step": {}}
    with pytest.raises(JobRefused, match="command in the step only"):
        translate(both, signer=None, signed_fields=[], policy_images=["ci"])


def test_credentials_are_removed_from_a_checkout_url() -> None:
    assert without_credentials("https://x:tok@git.example.org:8443/a.git") == "https://git.example.org:8443/a.git"
    assert without_credentials("git@github.com:a/b.git") == "git@github.com:a/b.git"


def test_the_streamers_fast_chunker_writes_what_the_chunker_writes() -> None:
    from runner.sources.buildkite.chunks import Chunker
    from runner.sources.buildkite.report import _Chunker
    rng = random.Random(7)
    alphabet = [b"a", b"b", b"\n", b"\x1b", b"[", b"K", b"2", b"\xff", b" "]
    for round_index in range(200):
        pieces = [b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(20)]
        limit = rng.choice([300, 600, 10_000])
        ticks, other_ticks = iter(range(10**6)), iter(range(10**6))
        base = Chunker(64, limit, lambda ticks=ticks: float(next(ticks)))
        fast = _Chunker(64, limit, lambda ticks=other_ticks: float(next(ticks)))
        for piece in pieces:
            base.feed(piece)
            fast.feed(piece)
        assert [c.data for c in base.close()] == [c.data for c in fast.close()], round_index


# -- artifacts ---------------------------------------------------------------------------------

ARTIFACT = protocol.Artifact(path='out/a "b".txt', absolute_path="/w/out/a.txt", glob_path="out/*",
                             file_size=3, sha1sum="1" * 40, sha256sum="2" * 64, content_type="text/plain")
ACTION = {"url": "https://storage.example/ignored?x=1", "method": "post", "path": "/bucket",
          "file_input": "file"}


def test_artifact_requests_use_the_job_token_and_the_agents_field_names() -> None:
    create = protocol.create_artifacts("job.1", "batch", [ARTIFACT])
    assert (create.method, create.path, create.token) == ("POST", "jobs/job%2E1/artifacts", "job")
    assert create.json_body == {"id": "batch", "upload_destination": "", "artifacts": [{
        "path": 'out/a "b".txt', "absolute_path": "/w/out/a.txt", "glob_path": "out/*", "file_size": 3,
        "sha1sum": "1" * 40, "sha256sum": "2" * 64, "content_type": "text/plain"}]}
    update = protocol.update_artifacts("job.1", [("a1", "finished"), ("a2", "error")])
    assert (update.method, update.path) == ("PUT", "jobs/job%2E1/artifacts")
    assert update.json_body == {"artifacts": [{"id": "a1", "state": "finished"},
                                              {"id": "a2", "state": "error"}]}
    with pytest.raises(ValueError):
        protocol.update_artifacts("j", [("a1", "uploaded")])


def test_each_artifact_gets_its_own_instructions_or_the_batchs_template() -> None:
    answer = {"id": "batch", "artifact_ids": ["a1", "a2"],
              "upload_instructions": {"action": ACTION, "data": {"key": "k/${artifact:path}"}},
              "per_artifact_instructions": {"a2": {"action": {**ACTION, "path": "/other"},
                                                   "data": {"key": "k2"}}}}
    [(first, template), (second, own)] = protocol.parse_artifact_batch(answer, 2)
    assert (first, template.path, template.method, template.data) == ("a1", "/bucket", "POST",
                                                                      (("key", "k/${artifact:path}"),))
    assert (second, own.path, own.data) == ("a2", "/other", (("key", "k2"),))
    # The URL's path is the action's, as the agent builds it.
    assert protocol.upload_url(template) == "https://storage.example/bucket?x=1"
    for bad in ({**answer, "artifact_ids": ["a1"]}, {**answer, "upload_instructions": None},
                {**answer, "per_artifact_instructions": {"a1": {"action": {**ACTION, "url": "file:///etc"}}}},
                {**answer, "upload_instructions": {"action": ACTION, "actions": [ACTION]}}, []):
        with pytest.raises(protocol.ProtocolError):
            protocol.parse_artifact_batch(bad, 2)


def test_the_upload_form_puts_the_fields_first_with_the_path_and_the_file_last() -> None:
    instructions = protocol.UploadInstructions("https://s.example/", "POST", "/up", "file",
                                               (("key", "jobs/1/${artifact:path}"), ("policy", "p")))
    form = protocol.upload_form(instructions, ARTIFACT, "BOUNDARY")
    body = form.head + b"abc" + form.tail
    assert form.content_type == "multipart/form-data; boundary=BOUNDARY"
    assert form.content_length(3) == len(body)
    disposition = b"--BOUNDARY\r\nContent-Disposition: form-data; "
    assert body == (disposition + b'name="key"\r\n\r\njobs/1/out/a "b".txt\r\n'
                    + disposition + b'name="policy"\r\n\r\np\r\n'
                    + disposition + b'name="file"; filename="out/a \\"b\\".txt"\r\n'
                    b"Content-Type: application/octet-stream\r\n\r\nabc\r\n--BOUNDARY--\r\n")
    with pytest.raises(ValueError):
        protocol.upload_form(instructions, ARTIFACT, "bad boundary\r\n")
