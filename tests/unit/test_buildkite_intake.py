"""Whatever JSON Buildkite hands over as a job, the source ends it in one finish or runs it.

The bounds of `intake.job_problem` as examples, then a property: random JSON (any nesting, any
types, in the step, its env, plugins and signature, and in the job's env) goes through the path
the source takes from an accept answer to the decision: the HTTP answer read by the client, the
bounds, the signature check, the translation, the policy. Only the network is left out (the
session answers from memory) and the checkout and the run (they come after the decision).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from fakes.buildkite_signer import StepSigner, signed_job
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from runner.config import BuildkiteConfig
from runner.job import JobState
from runner.sources import Ended, LogSink, StateWatcher
from runner.sources.buildkite import protocol
from runner.sources.buildkite import source as source_module
from runner.sources.buildkite.client import AgentSession
from runner.sources.buildkite.intake import MAX_NESTING, MAX_TEXT, MAX_VALUES, job_problem
from runner.sources.buildkite.source import BuildkiteSource

from .buildkite_host import FakeHost

PLUGIN_SOURCE = "hpc-runner#v1"
REPO = "https://example.invalid/org/repo.git"


def nested(depth: int, leaf: object = "leaf") -> object:
    value = leaf
    for _ in range(depth):
        value = {"deeper": value}
    return value


# -- the bounds --------------------------------------------------------------------------------


def test_a_large_but_real_job_is_within_bounds() -> None:
    # A plugin block as deep as the bound allows (the job, its step, the plugins list and the
    # plugin are the first four levels), a long inline script, a few hundred variables, a matrix.
    config = nested(MAX_NESTING - 5, {"image": "test"})
    job = signed_job(StepSigner(), "make test\n" * 20_000, repo=REPO, plugins=[{PLUGIN_SOURCE: config}],
                     step_env={f"VAR_{i}": "value" * 20 for i in range(300)})
    job["step"]["matrix"] = {"setup": {"os": [f"os{i}" for i in range(100)], "py": ["3.10", "3.11"]}}
    assert job_problem(job) is None


@pytest.mark.parametrize(("job", "problem"), [
    ({"step": {"plugins": [{PLUGIN_SOURCE: nested(MAX_NESTING - 3)}]}},
     "the job's step.plugins is nested deeper than 64 levels"),
    ({"env": {"BUILDKITE_PLUGINS": "[" * 65 + "]" * 65}},
     "the job's BUILDKITE_PLUGINS[0][0] is nested deeper than 64 levels"),
    ({"env": {"BUILDKITE_PLUGINS": "[" * 5000 + "]" * 5000}},
     "the job's BUILDKITE_PLUGINS is nested deeper than 64 levels"),
    ({"env": ["BUILDKITE_REPO=x"]}, "the job's env is not a map of strings (it is a list)"),
    ({"env": {"MODE": {"a": "b"}}}, "the job's env is not a map of strings (MODE is a map)"),
    ({"env": {"x" * 100: 1}},
     "the job's env is not a map of strings (<a name of 100 characters> is a number)"),
    ({"step": ["make"]}, "the job's step is not a map (it is a list)"),
    ({"matrix_permutation": {"os": 1}},
     "the job's matrix_permutation is not a map of strings (os is a number)"),
    ({"step": {"env": {"A": "\ud800"}}},
     "the job's step.env holds a lone surrogate, which is no Unicode text"),
    ({"step": {"plugins": [{"x": float("nan")}]}},
     "the job's step.plugins holds nan, which JSON does not allow"),
    ({"step": {"matrix": list(range(MAX_VALUES))}}, f"the job holds more than {MAX_VALUES} values"),
    ({"step": {"command": "x" * (MAX_TEXT + 1)}}, f"the job holds more than {MAX_TEXT} characters of text"),
])
def test_a_job_out_of_bounds_or_of_the_wrong_shape_is_named(job: dict[str, Any], problem: str) -> None:
    assert job_problem(job) == problem


def test_the_nesting_bound_counts_from_the_job() -> None:
    # The job, its step, the plugins list, the plugin: then the config's own levels.
    at_limit = {"step": {"plugins": [{PLUGIN_SOURCE: nested(MAX_NESTING - 4)}]}}
    assert job_problem(at_limit) is None
    assert job_problem({"step": {"plugins": [{PLUGIN_SOURCE: nested(MAX_NESTING - 3)}]}}) is not None


# -- random JSON through the source -------------------------------------------------------------


class MemorySession(AgentSession):
    """An agent session whose answers come from memory: the accept answer is the given bytes, the
    job's other calls succeed. Every request is kept, its JSON body decoded."""

    def __init__(self) -> None:
        super().__init__(cast(aiohttp.ClientSession, None), "http://buildkite.invalid/v3", "registration",
                         policies=FAST)
        self.session_token = "session"
        self.accept_answer = b"{}"
        self.sent: list[tuple[str, Any]] = []

    async def _send(self, request: protocol.ApiRequest, job_token: str | None
                    ) -> tuple[int | None, bytes, str | None]:
        body = request.encoded_body()
        self.sent.append((request.name, json.loads(body) if request.json_body is not None and body else body))
        if request.name == "accept":
            return 200, self.accept_answer, None
        if request.name == "job_state":
            return 200, b'{"state": "running"}', None
        return 200, b"{}", None


class QuickHost(FakeHost):
    """Admits with the real policy and store; a run ends at once, recorded."""

    async def run(self, job_id: str, *, sink: LogSink, cancel: asyncio.Event, offset: int = 0,
                  on_change: StateWatcher | None = None) -> Ended:
        self.ran.append(job_id)
        self.store.set_state(job_id, JobState.succeeded, exit_status=0)
        return Ended(JobState.succeeded, 0, None)


@pytest.fixture
def sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[bool, BuildkiteSource]]:
    """A source with verification keys and one with allow_unsigned, over one host."""
    async def no_checkout(*args: object, **kwargs: object) -> str:
        return ""
    monkeypatch.setattr(source_module, "checkout", no_checkout)
    token = tmp_path / "token"
    token.write_text("registration\n")
    token.chmod(0o600)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(SIGNER.public_jwks())
    host = QuickHost(tmp_path / "site")
    made: dict[bool, BuildkiteSource] = {}
    for signed in (True, False):
        config = BuildkiteConfig(token_file=token, verification_jwks_file=jwks if signed else None,
                                 allow_unsigned=not signed)
        made[signed] = BuildkiteSource(config, host, host.buildkite_state())
        made[signed].load_trust()
    yield made
    host.store.close()


SIGNER = StepSigner()
FAST = {name: policy.scaled(0.001) for name, policy in protocol.DEFAULT_POLICIES.items()}
REGISTRATION = protocol.Registration(agent_id="a", name="a", access_token="session", endpoint=None,
                                     request_headers={}, ping_interval=1, job_status_interval=1,
                                     heartbeat_interval=1)
# Placeholders replaced in the answer's text by a deep nesting (which json.dumps would refuse),
# as a value and as a string of JSON text.
DEEP = "\x00deep\x00"
DEEP_TEXT = "\x00deep text\x00"

texts = st.text(st.characters(exclude_categories=()), max_size=12)   # lone surrogates too
scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(texts, inner, max_size=4), max_leaves=16)
# What a signer can sign: JSON values without NaN, infinities or lone surrogates.
signable_texts = st.text(max_size=12)
signable_scalars = (st.none() | st.booleans() | st.integers() | signable_texts
                    | st.floats(allow_nan=False, allow_infinity=False))
signable = st.recursive(signable_scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(signable_texts, inner, max_size=4), max_leaves=16)
# Where a random value may go: the step and its parts, the job's env and parts of it, the job.
PLACES = [("step",), ("step", "env"), ("step", "plugins"), ("step", "signature"), ("step", "matrix"),
          ("step", "command"), ("step", "signature", "signed_fields"), ("step", "signature", "value"),
          ("env",), ("env", "BUILDKITE_PLUGINS"), ("env", "BUILDKITE_COMMAND"), ("env", "BUILDKITE_REPO"),
          ("env", "BUILDKITE_PULL_REQUEST"), ("matrix_permutation",), ("token",), ("chunks_max_size_bytes",)]


@st.composite
def accept_answers(draw: st.DrawFn) -> bytes:
    """The body of an accept answer: a job signed or not, then changed at random places."""
    config = draw(st.none() | st.just({"image": "test"}) | signable)
    plugins = None if config is None else [{draw(st.sampled_from([PLUGIN_SOURCE, "docker#v5"])): config}]
    step_env = draw(st.dictionaries(st.from_regex(r"[A-Z][A-Z_]{0,6}", fullmatch=True), signable_texts,
                                    max_size=3))
    job = signed_job(draw(st.sampled_from([SIGNER, StepSigner(), None])), draw(signable_texts) or "make",
                     repo=REPO, plugins=plugins, step_env=step_env)
    for _ in range(draw(st.integers(0, 3))):
        place = draw(st.sampled_from(PLACES))
        parent: Any = job
        for key in place[:-1]:
            parent = parent.get(key) if isinstance(parent, Mapping) else None
        if not isinstance(parent, dict):
            continue
        how = draw(st.sampled_from(["random", "random as JSON text", "deep", "deep as JSON text", "delete"]))
        if how == "delete":
            parent.pop(place[-1], None)
        elif how == "random as JSON text":  # as BUILDKITE_PLUGINS holds the plugins
            parent[place[-1]] = json.dumps(draw(json_values))
        elif how == "deep":
            parent[place[-1]] = DEEP
        elif how == "deep as JSON text":
            parent[place[-1]] = DEEP_TEXT
        else:
            parent[place[-1]] = draw(json_values)
    # 700 levels raised RecursionError out of the signature check; json itself reads them. (An
    # answer json cannot read at all is a test of its own.)
    depth = draw(st.sampled_from([MAX_NESTING - 8, MAX_NESTING + 1, 700]))
    deep = "[" * depth + "1" + "]" * depth
    text = json.dumps(job).replace(json.dumps(DEEP), deep).replace(json.dumps(DEEP_TEXT), json.dumps(deep))
    return text.encode()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answer=accept_answers(), signed=st.booleans())
def test_any_accepted_job_ends_in_one_finish_or_runs_and_never_reaches_the_catch_all(
        answer: bytes, signed: bool, sources: dict[bool, BuildkiteSource]) -> None:
    source = sources[signed]
    session = MemorySession()
    session.accept_answer = answer
    bk_id = str(uuid.uuid4())
    ran_before = len(source.host.ran)  # type: ignore[attr-defined]

    with capture_logs() as logs:
        took = asyncio.run(source._take(session, bk_id, REGISTRATION, asyncio.Event()))

    assert took
    # The intake handled the job itself: the catch-all at the job's boundary saw nothing.
    assert [entry for entry in logs if entry.get("exc_info") or entry["log_level"] == "error"] == []
    finishes = [body for name, body in session.sent if name == "finish"]
    assert len(finishes) == 1, session.sent
    event(f"finished {finishes[0]['exit_status']} {finishes[0].get('signal_reason')}")
    ran = len(source.host.ran) - ran_before  # type: ignore[attr-defined]
    if finishes[0]["exit_status"] == "0":
        assert ran == 1
    else:
        assert (finishes[0]["exit_status"], ran) == ("-1", 0)
        assert finishes[0]["signal_reason"] in ("signature_rejected", "agent_refused")
        # The reason is in the job's log.
        assert any(name == "chunks" for name, _ in session.sent)
    names = [name for name, _ in session.sent]
    # Started before any log or finish; a job that runs is started once its runner job runs, and
    # until then the source only asks whether it was cancelled at Buildkite.
    assert names[0] == "accept" and "start" in names, names
    assert set(names[1:names.index("start")]) <= {"job_state"}, names


def test_an_accept_answer_json_cannot_read_is_not_taken_and_the_session_goes_on(
        sources: dict[bool, BuildkiteSource]) -> None:
    """Nested deeper than Python's json reads, the answer is unreadable like a proxy's page: the
    accept is retried, then given up, and the session pings for the next job."""
    session = MemorySession()
    session.accept_answer = b'{"id": "x", "step": ' + b"[" * 5000 + b"]" * 5000 + b"}"

    took = asyncio.run(sources[True]._take(session, str(uuid.uuid4()), REGISTRATION, asyncio.Event()))

    assert not took
    assert {name for name, _ in session.sent} == {"accept"}
