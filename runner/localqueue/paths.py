"""Where the local queue's socket lives for a given config."""

from __future__ import annotations

import os
from pathlib import Path

from runner.config import AgentConfig
from runner.errors import InputError

# sockaddr_un holds 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH_BYTES = 107


def socket_path(config: AgentConfig) -> Path:
    return config.socket or config.state_dir / "agent.sock"


def socket_mode(config: AgentConfig) -> int:
    """Inside the private state dir only the agent's user can reach the socket anyway; a socket
    the admin placed elsewhere is for every local user (the policy decides what each may do)."""
    return 0o600 if config.socket is None else 0o666


def check_socket_path(path: Path) -> None:
    """Refuse a path the kernel cannot bind or connect a Unix socket to, saying why."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise InputError(f"the local queue socket {path} is {size} bytes long; a Unix socket path has at "
                         f"most {MAX_SOCKET_PATH_BYTES}: set a shorter `socket` in the config",
                         field="socket")
