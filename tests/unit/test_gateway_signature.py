"""The webhook signature, against the test vector of GitHub's "Validating webhook deliveries"."""

from __future__ import annotations

import pytest

from runner.gateway.signature import signature_for, signature_matches

# docs: content/webhooks/using-webhooks/validating-webhook-deliveries.md
VECTOR_SECRET = b"It's a Secret to Everybody"
VECTOR_PAYLOAD = b"Hello, World!"
VECTOR_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def test_github_test_vector_gives_the_documented_signature() -> None:
    assert signature_for(VECTOR_SECRET, VECTOR_PAYLOAD) == VECTOR_SIGNATURE


def test_github_test_vector_is_accepted() -> None:
    assert signature_matches(VECTOR_SECRET, VECTOR_PAYLOAD, VECTOR_SIGNATURE)


@pytest.mark.parametrize("secret, payload, header", [
    (b"It's a secret to everybody", VECTOR_PAYLOAD, VECTOR_SIGNATURE),          # another secret
    (VECTOR_SECRET, b"Hello, World?", VECTOR_SIGNATURE),                        # tampered body
    (VECTOR_SECRET, VECTOR_PAYLOAD + b"\n", VECTOR_SIGNATURE),                  # one byte more
    (VECTOR_SECRET, VECTOR_PAYLOAD, VECTOR_SIGNATURE.removeprefix("sha256=")),  # bare hex
    (VECTOR_SECRET, VECTOR_PAYLOAD, "sha1=" + VECTOR_SIGNATURE[7:]),             # another algorithm
    (VECTOR_SECRET, VECTOR_PAYLOAD, VECTOR_SIGNATURE[:-1]),                     # truncated
    (VECTOR_SECRET, VECTOR_PAYLOAD, VECTOR_SIGNATURE + " "),
    (VECTOR_SECRET, VECTOR_PAYLOAD, ""),
    (VECTOR_SECRET, VECTOR_PAYLOAD, "sha256=" + "é" * 64),                      # not ASCII
])
def test_anything_but_the_exact_signature_is_refused(secret: bytes, payload: bytes, header: str) -> None:
    assert not signature_matches(secret, payload, header)
