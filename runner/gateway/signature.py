"""GitHub's webhook signature: HMAC-SHA256 of the raw request body, keyed with the webhook secret.

GitHub sends it as `X-Hub-Signature-256: sha256=<lowercase hex>`. The legacy SHA-1 header
(`X-Hub-Signature`) is not accepted: SHA-1 is only there for old receivers.
"""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "sha256="


def signature_for(secret: bytes, body: bytes) -> str:
    """The `X-Hub-Signature-256` value GitHub sends for `body` under `secret`."""
    return PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()


def signature_matches(secret: bytes, body: bytes, header: str) -> bool:
    """True when `header` is the signature of `body` under `secret`, compared in constant time.

    The whole header value is compared, prefix included, so the time taken tells an attacker
    nothing about how many leading characters were right.
    """
    expected = signature_for(secret, body).encode("ascii")
    try:
        presented = header.encode("ascii")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(expected, presented)
