"""The hub's contract for API jobs, shared with the agents' client: paths, state publications,
registrations and lease answers, checked alike on both sides."""

from __future__ import annotations

import pytest

from runner.gateway import jobs_protocol as protocol
from runner.identity import Identity

JOB = {"name": "unit", "image": "julia", "command": ["true"]}


def test_paths() -> None:
    assert protocol.job_path("01jabcdefghjk") == "/api/v1/jobs/01jabcdefghjk"
    assert protocol.job_log_path("01jabcdefghjk") == "/api/v1/jobs/01jabcdefghjk/log"
    assert protocol.agent_state_path("01jabcdefghjk") == "/api/v1/agent/jobs/01jabcdefghjk/state"
    assert protocol.agent_log_path("01jabcdefghjk") == "/api/v1/agent/jobs/01jabcdefghjk/log"
    assert protocol.job_url("https://hub.example.org/", "01jabcdefghjk") == "https://hub.example.org/jobs/01jabcdefghjk"
    with pytest.raises(ValueError, match="not a job id"):
        protocol.job_path("../leases")


def test_a_state_body_round_trips_and_keeps_only_what_it_names() -> None:
    body = protocol.state_body("succeeded", exit_status=0, ended=1_800_000_000.5, admins=("github:team:a/b",))
    assert body == {"state": "succeeded", "exit_status": 0, "ended": "2027-01-15T08:00:00.500Z",
                    "admins": ["github:team:a/b"]}
    update = protocol.parse_state_update(body)
    assert update.given == {"state", "exit_status", "ended", "admins"}
    assert (update.ended, update.started) == (1_800_000_000.5, None)
    assert update.to_json() == body


@pytest.mark.parametrize("body, words", [
    ({"state": "done"}, "state must be one of queued"),
    ({"state": "failed", "exit_status": 256}, "exit_status must be"),
    ({"state": "failed", "exit_status": True}, "exit_status must be"),
    ({"state": "failed", "reasons": "no"}, "reasons must be a list"),
    ({"state": "failed", "slurm_job_id": 12}, "slurm_job_id must be"),
    ({"state": "failed", "started": "yesterday"}, "started must be a UTC time"),
    ({"state": "failed", "log": "x"}, "unknown field(s) log"),
    ({"state": "failed", "account": "a b"}, "account must be a name"),
])
def test_bad_state_publications_are_refused_naming_the_field(body: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError) as caught:
        protocol.parse_state_update(body)
    assert words in str(caught.value)


def test_a_registration_carries_a_verified_identity_and_a_valid_job() -> None:
    identity = Identity(source="buildkite", organization="clima", pipeline="ocean")
    body = protocol.registration_body(JOB, identity, "hpc1", commit="abc", created=1_800_000_000.0)
    registration = protocol.parse_registration(body)
    assert (registration.identity, registration.cluster, registration.created) == (identity, "hpc1",
                                                                                   1_800_000_000.0)
    with pytest.raises(ValueError, match=r"job\.command: must not be empty"):
        protocol.parse_registration(body | {"job": JOB | {"command": []}})
    with pytest.raises(ValueError, match=r"identity: .*source"):
        protocol.parse_registration(body | {"identity": {"source": "nobody"}})
    with pytest.raises(ValueError, match="cluster must be a cluster name"):
        protocol.parse_registration(body | {"cluster": None})


def test_a_lease_answer_round_trips() -> None:
    lease = protocol.JobLease(id="01jabcdefghjk", job=JOB, token="a.b.c", issuer="github", cluster=None,
                              repository="CliMA/X", commit="f" * 40, received_at=1_800_000_000.25,
                              lease_seconds=120, lease_expires_at=1_800_000_120.25, attempt=2,
                              cancel_requested=False)
    assert protocol.parse_job_lease(lease.to_json()) == lease
    with pytest.raises(ValueError, match="has no 'token'"):
        protocol.parse_job_lease({k: v for k, v in lease.to_json().items() if k != "token"})
