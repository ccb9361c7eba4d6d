"""The rule every URL the agent or the hub calls out to follows: https, or plain http to loopback.

Plain http is allowed only to this machine (127.0.0.0/8, ::1, `localhost`), where the tests run
their emulators; anything else would let a network path read or change what is said.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

_LOOPBACK_NAMES = ("localhost", "localhost.localdomain")
# The longest URL a config may give (issuers, their keys, hooks).
MAX_URL_LENGTH = 2048


def is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def https_url(text: str) -> str:
    """`text` if it is an https URL (http only to a loopback host, for tests); else ValueError."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a port out of range
    except ValueError:
        raise ValueError(f"{text!r} is not a URL") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{text!r} is not an https:// URL")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ValueError(f"{text!r} must use https:// (plain http only to localhost, for tests)")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain credentials: put secrets in files")
    if parts.fragment or any(ch.isspace() for ch in text):
        raise ValueError(f"{text!r} must not contain a fragment or whitespace")
    return text


def config_https_url(value: object) -> str:
    """A config's value that must be an https URL of a sane length; else ValueError."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if len(value) > MAX_URL_LENGTH:
        raise ValueError(f"is longer than {MAX_URL_LENGTH} characters")
    return https_url(value)
