"""The OpenAPI validator that the GitHub emulator checks every request with."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from .openapi_validator import OpenApiDescription, OpenApiValidationError, load_description


@pytest.fixture(scope="module")
def api() -> OpenApiDescription:
    return load_description()


def check_run(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "hpc-runner / mpi-tests",
        "head_sha": "6dcb09b5b57875f334f61aebed695e2e4193db5e",
        "status": "in_progress",
        "external_id": "job-17",
        "started_at": "2026-11-26T10:00:00Z",
        "output": {"title": "Running", "summary": "on 2 nodes", "text": "log..."},
        "actions": [{"label": "Cancel", "description": "Cancel the Slurm job", "identifier": "cancel"}],
    }
    body.update(overrides)
    return body


def create(api: OpenApiDescription, body: Any, path: str = "/repos/CliMA/ClimaAtmos.jl/check-runs",
           **kwargs: Any) -> str:
    op, _ = api.validate_request("POST", path, body=json.dumps(body).encode(),
                                 content_type="application/json", **kwargs)
    return op.operation_id


def rejected(api: OpenApiDescription, method: str, path: str, body: Any = None,
             **kwargs: Any) -> OpenApiValidationError:
    raw = None if body is None else json.dumps(body).encode()
    with pytest.raises(OpenApiValidationError) as info:
        api.validate_request(method, path, body=raw, content_type="application/json", **kwargs)
    return info.value


def test_a_good_check_run_is_accepted(api: OpenApiDescription) -> None:
    assert create(api, check_run()) == "checks/create"
    assert create(api, check_run(status="completed", conclusion="success",
                                 completed_at="2026-11-26T10:05:00Z",
                                 output={"title": "t", "summary": "é" * 65535})) == "checks/create"


def test_an_unknown_conclusion_is_rejected_naming_operation_field_and_rule(api: OpenApiDescription) -> None:
    err = rejected(api, "POST", "/repos/o/r/check-runs", check_run(conclusion="passed"))
    assert (err.operation, err.field, err.rule) == ("checks/create", "body.conclusion", "enum")
    assert "'passed' is not one of" in str(err) and "checks/create" in str(err)


def test_a_check_run_without_a_name_is_rejected(api: OpenApiDescription) -> None:
    body = check_run()
    del body["name"]
    err = rejected(api, "POST", "/repos/o/r/check-runs", body)
    assert (err.field, err.rule) == ("body", "required")
    assert "'name' is a required property" in str(err)


def test_output_text_longer_than_65535_characters_is_rejected(api: OpenApiDescription) -> None:
    err = rejected(api, "POST", "/repos/o/r/check-runs",
                   check_run(output={"title": "t", "summary": "s", "text": "x" * 65536}))
    assert (err.field, err.rule) == ("body.output.text", "maxLength 65535")
    assert "65536 characters, at most 65535" in str(err)


def test_action_limits_come_from_the_description(api: OpenApiDescription) -> None:
    action = {"label": "Re-run on the cluster", "description": "d", "identifier": "rerun"}  # 21 chars
    err = rejected(api, "POST", "/repos/o/r/check-runs", check_run(actions=[action]))
    assert (err.field, err.rule) == ("body.actions.0.label", "maxLength 20")
    four = [{"label": f"a{i}", "description": "d", "identifier": f"i{i}"} for i in range(4)]
    err = rejected(api, "POST", "/repos/o/r/check-runs", check_run(actions=four))
    assert (err.field, err.rule) == ("body.actions", "maxItems 3")


def test_a_misspelt_field_is_caught_although_github_would_ignore_it(api: OpenApiDescription) -> None:
    err = rejected(api, "POST", "/repos/o/r/check-runs", check_run(conclusoin="success"))
    assert err.rule == "additionalProperties" and "'conclusoin' was unexpected" in str(err)


def test_dates_must_be_iso_8601_with_a_zone(api: OpenApiDescription) -> None:
    err = rejected(api, "POST", "/repos/o/r/check-runs", check_run(started_at="2026-11-26 10:00:00"))
    assert (err.field, err.rule) == ("body.started_at", "format date-time")


def test_completing_a_check_run_needs_a_conclusion(api: OpenApiDescription) -> None:
    err = rejected(api, "PATCH", "/repos/o/r/check-runs/4", {"status": "completed"})
    assert err.operation == "checks/update" and err.rule == "anyOf"
    assert "'conclusion' is a required property" in str(err)
    op, params = api.validate_request("PATCH", "/repos/o/r/check-runs/4", content_type="application/json",
                                      body=b'{"status": "completed", "conclusion": "failure"}')
    assert (op.operation_id, params["check_run_id"]) == ("checks/update", 4)


def test_nullable_fields_take_null(api: OpenApiDescription) -> None:
    op, _ = api.validate_request("POST", "/repos/o/r/statuses/abc", content_type="application/json",
                                 body=b'{"state": "success", "target_url": null, "description": null}')
    assert op.operation_id == "repos/create-commit-status"
    err = rejected(api, "POST", "/repos/o/r/statuses/abc", {"state": None})
    assert err.field == "body.state"


def test_path_and_query_parameters_are_typed_and_checked(api: OpenApiDescription) -> None:
    err = rejected(api, "PATCH", "/repos/o/r/check-runs/abc", {"name": "x"})
    assert (err.field, err.rule) == ("path.check_run_id", "type integer")
    err = rejected(api, "GET", "/repos/o/r/pulls", query=[("per_page", "many")])
    assert (err.field, err.rule) == ("query.per_page", "type integer")
    err = rejected(api, "GET", "/repos/o/r/pulls", query=[("state", "merged")])
    assert (err.field, err.rule) == ("query.state", "enum")
    err = rejected(api, "GET", "/repos/o/r/pulls", query=[("sate", "open")])
    assert (err.field, err.rule) == ("query.sate", "unknown parameter")
    op, _ = api.validate_request("GET", "/repos/o/r/pulls", query=[("state", "all"), ("per_page", "100")])
    assert op.operation_id == "pulls/list"


def test_literal_segments_win_and_paths_may_span_slashes(api: OpenApiDescription) -> None:
    op, _ = api.match("GET", "/repos/o/r/pulls/comments")
    assert op.operation_id == "pulls/list-review-comments-for-repo"
    op, params = api.match("GET", "/repos/o/r/contents/.github/hpc/jobs.toml")
    assert (op.operation_id, params["path"]) == ("repos/get-content", ".github/hpc/jobs.toml")
    op, params = api.match("GET", "/repos/o/r/commits/feature%2Fx/check-runs")
    assert (op.operation_id, params["ref"]) == ("checks/list-for-ref", "feature/x")
    op, params = api.match("GET", "/repos/o/r/git/ref/heads/feature/x")
    assert (op.operation_id, params["ref"]) == ("git/get-ref", "heads/feature/x")


def test_unknown_operations_are_rejected(api: OpenApiDescription) -> None:
    err = rejected(api, "GET", "/repos/o/r/nope")
    assert err.operation is None and err.rule == "unknown operation"
    err = rejected(api, "PUT", "/repos/o/r/pulls/1")
    assert "exists for" in str(err) and "GET" in str(err)


def test_an_enterprise_server_prefix_is_stripped(api: OpenApiDescription) -> None:
    assert create(api, check_run(), path="/api/v3/repos/o/r/check-runs", prefix="/api/v3") == "checks/create"
    err = rejected(api, "GET", "/repos/o/r/pulls", prefix="/api/v3")
    assert "/api/v3" in str(err)


def test_bodies_must_be_json_and_only_where_the_operation_takes_one(api: OpenApiDescription) -> None:
    with pytest.raises(OpenApiValidationError, match="not JSON"):
        api.validate_request("POST", "/repos/o/r/check-runs", body=b"{", content_type="application/json")
    with pytest.raises(OpenApiValidationError, match="application/json"):
        api.validate_request("POST", "/repos/o/r/check-runs", body=b"{}", content_type="text/plain")
    with pytest.raises(OpenApiValidationError, match="takes no request body"):
        api.validate_request("GET", "/repos/o/r/pulls/1", body=b"{}", content_type="application/json")
    with pytest.raises(OpenApiValidationError, match="request body is required"):
        api.validate_request("POST", "/repos/o/r/check-runs")


def test_responses_are_checked_against_the_documented_status(api: OpenApiDescription) -> None:
    op = api.operations["repos/create-commit-status"]
    with pytest.raises(OpenApiValidationError, match="status 200 is not a documented response"):
        api.validate_response(op, 200, {})
    with pytest.raises(OpenApiValidationError) as info:
        api.validate_response(op, 201, {"state": "success"})
    assert info.value.rule == "required"


def test_the_description_is_parsed_once() -> None:
    load_description()
    started = time.perf_counter()
    again = load_description()
    assert time.perf_counter() - started < 0.01
    assert again is load_description()
    assert len(again.operations) > 1000
