"""A job's declared outputs as they were collected when it ended: what a source hands on (Buildkite
artifacts, the check run's summary, the hub) and what its provenance record names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Where a job's collected outputs are kept, inside its directory (retention's `outputs` removes it).
OUTPUTS_DIR = "outputs"


@dataclass(frozen=True)
class OutputFile:
    """One collected file: its path under the job's workspace (/work), as the job wrote it."""

    path: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}
