"""A job ready to start: what preparation (runner.lifecycle.prepare) made of an allowed decision.

Executors take it as it is; how each launches it is theirs (runner.executors), so nothing here
knows of an executor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runner.policy import Decision
from runner.spec import JobSpec
from sandbox.images import VerifiedImage
from sandbox.plan import SandboxPlan


@dataclass(frozen=True)
class PreparedJob:
    job_id: str
    spec: JobSpec
    decision: Decision
    image: VerifiedImage
    plan: SandboxPlan
    argv: tuple[str, ...]
    workspace: Path
    job_dir: Path
    log_path: Path
