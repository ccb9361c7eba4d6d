"""Where the local queue's socket lives for a given config."""

from __future__ import annotations

from pathlib import Path

from runner.config import AgentConfig


def socket_path(config: AgentConfig) -> Path:
    return config.socket or config.state_dir / "agent.sock"


def socket_mode(config: AgentConfig) -> int:
    """Inside the private state dir only the agent's user can reach the socket anyway; a socket
    the admin placed elsewhere is for every local user (the policy decides what each may do)."""
    return 0o600 if config.socket is None else 0o666
