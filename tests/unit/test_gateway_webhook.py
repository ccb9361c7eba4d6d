"""Deciding about one webhook without I/O: what is refused (and why), ignored, or queued."""

from __future__ import annotations

import json

import pytest

from runner.gateway.signature import signature_for
from runner.gateway.webhook import (
    MAX_BODY_BYTES,
    WANTED_EVENTS,
    Accepted,
    Ignored,
    Refused,
    check_webhook,
    refuse_before_reading,
)

SECRET = "a webhook secret of some length"
BODY = json.dumps({"action": "opened", "number": 1}).encode()


DELIVERY = "72d3162e-cc78-11e3-81ab-4c9367dc0958"


def headers(event: str = "pull_request", body: bytes = BODY, *, delivery: str = DELIVERY,
            secret: str | None = SECRET, **extra: str) -> dict[str, str]:
    found = {"Content-Type": "application/json", "X-GitHub-Event": event, "X-GitHub-Delivery": delivery}
    if secret is not None:
        found["X-Hub-Signature-256"] = signature_for(secret.encode(), body)
    found.update(extra)
    return found


def check(hdrs: dict[str, str], body: bytes = BODY) -> Accepted | Ignored | Refused:
    return check_webhook(hdrs, body, SECRET.encode())


def test_a_signed_pull_request_is_accepted_with_its_body_untouched() -> None:
    verdict = check(headers())
    assert verdict == Accepted("pull_request", DELIVERY, BODY, "opened")


def test_header_names_are_matched_whatever_their_case() -> None:
    lowered = {name.lower(): value for name, value in headers().items()}
    assert isinstance(check(lowered), Accepted)


@pytest.mark.parametrize("event", sorted(WANTED_EVENTS))
def test_each_event_the_agents_use_is_accepted(event: str) -> None:
    assert isinstance(check(headers(event)), Accepted)


def test_without_a_signature_it_is_refused_401() -> None:
    verdict = check(headers(secret=None))
    assert verdict == Refused(401, "no X-Hub-Signature-256 header: the webhook must have a secret")


def test_a_sha1_signature_alone_is_refused_and_the_message_says_sha256_is_needed() -> None:
    hdrs = headers(secret=None, **{"X-Hub-Signature": "sha1=0123456789abcdef0123456789abcdef01234567"})
    verdict = check(hdrs)
    assert isinstance(verdict, Refused) and verdict.status == 401
    assert "X-Hub-Signature-256" in verdict.reason and "SHA-1" in verdict.reason


def test_a_signature_under_another_secret_is_refused_401() -> None:
    verdict = check(headers(secret="another secret entirely"))
    assert isinstance(verdict, Refused) and verdict.status == 401
    assert "does not match" in verdict.reason


def test_a_tampered_body_is_refused_401() -> None:
    verdict = check(headers(), BODY.replace(b"1", b"2"))
    assert isinstance(verdict, Refused) and verdict.status == 401


def test_the_signature_is_checked_before_anything_else_is_believed() -> None:
    # An unsigned form-encoded ping with a bad delivery id: the missing signature is what counts.
    hdrs = headers("ping", secret=None, **{"Content-Type": "application/x-www-form-urlencoded",
                                          "X-GitHub-Delivery": "../../etc"})
    verdict = check(hdrs)
    assert isinstance(verdict, Refused) and verdict.status == 401


def test_a_form_encoded_webhook_is_refused_415_with_the_fix() -> None:
    body = b"payload=" + BODY
    verdict = check(headers(body=body, **{"Content-Type": "application/x-www-form-urlencoded"}), body)
    assert isinstance(verdict, Refused) and verdict.status == 415
    assert "application/json" in verdict.reason


def test_a_charset_parameter_on_the_content_type_is_fine() -> None:
    assert isinstance(check(headers(**{"Content-Type": "application/json; charset=utf-8"})), Accepted)


@pytest.mark.parametrize("name, value", [
    ("X-GitHub-Event", ""), ("X-GitHub-Event", "Pull Request"), ("X-GitHub-Delivery", ""),
    ("X-GitHub-Delivery", "../../etc/passwd"), ("X-GitHub-Delivery", "x" * 129),
])
def test_a_malformed_event_or_delivery_header_is_refused_400(name: str, value: str) -> None:
    verdict = check(headers(**{name: value}))
    assert isinstance(verdict, Refused) and verdict.status == 400
    assert name in verdict.reason


@pytest.mark.parametrize("event", ["ping", "check_suite", "workflow_job", "installation", "star"])
def test_other_events_are_ignored_not_refused(event: str) -> None:
    verdict = check(headers(event))
    assert isinstance(verdict, Ignored) and verdict.event == event
    assert "pull_request" in verdict.reason


@pytest.mark.parametrize("body, reason", [
    (b"payload=%7B%7D", "the body is not JSON"),
    (b"\xff\xfe{", "the body is not JSON"),
    (b"[1, 2]", "the body is not a JSON object"),
    (b'"text"', "the body is not a JSON object"),
])
def test_a_signed_body_that_is_not_a_json_object_is_refused_400(body: bytes, reason: str) -> None:
    assert check(headers(body=body), body) == Refused(400, reason)


def test_size_limit_before_reading_the_body() -> None:
    signed = headers()
    assert refuse_before_reading(signed, MAX_BODY_BYTES) is None
    assert refuse_before_reading(signed, None) is None
    refused = refuse_before_reading(signed, MAX_BODY_BYTES + 1)
    assert refused is not None and refused.status == 413


def test_a_body_over_the_limit_is_refused_413_even_when_signed() -> None:
    body = b" " * (MAX_BODY_BYTES + 1)
    verdict = check(headers(body=body), body)
    assert isinstance(verdict, Refused) and verdict.status == 413


def test_the_limit_is_25_mib() -> None:
    assert MAX_BODY_BYTES == 25 * 1024 * 1024
