"""The local queue's wire format: one JSON request line, one JSON response line.

`logs` and `provenance` are the exceptions. After its response line `logs` streams the log's
raw bytes until the log is complete (or, without `follow`, until what exists is sent), so the
client prints exactly what the job wrote; `provenance` sends the record's stored bytes, as many
as its response line's `bytes` says, so that their digest is the record's.
"""

from __future__ import annotations

import json
from typing import Any

from runner.tomlsource import MAX_FILE_BYTES

# A submit carries a job file of up to MAX_FILE_BYTES as a JSON string, which writes a character
# of valid TOML in at most three times its UTF-8 bytes (an emoji as two \u escapes).
MAX_REQUEST_BYTES = 3 * MAX_FILE_BYTES + 64 * 1024
OPS = ("submit", "status", "logs", "cancel", "ping", "show", "provenance", "replay")


class ProtocolError(ValueError):
    pass


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def decode_request(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"request is larger than {MAX_REQUEST_BYTES} bytes")
    try:
        message = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ProtocolError("request is not JSON") from None
    except RecursionError:
        raise ProtocolError("request is not JSON (nested too deeply)") from None
    if not isinstance(message, dict) or message.get("op") not in OPS:
        raise ProtocolError(f"request needs an op among {', '.join(OPS)}")
    return message


def decode_response(line: bytes) -> dict[str, Any]:
    if not line:
        raise ProtocolError("the agent closed the connection without answering")
    try:
        message = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ProtocolError("the agent's answer is not JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("the agent's answer is not an object")
    return message
