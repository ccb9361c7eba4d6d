"""Where the local queue's socket lives for a given config."""

from __future__ import annotations

from pathlib import Path

from runner.config import AgentConfig


def socket_path(config: AgentConfig) -> Path:
    return config.state_dir / "agent.sock"
