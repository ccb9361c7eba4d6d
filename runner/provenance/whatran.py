"""The `--- what ran` group that ends every log of a job that ran (pure): the facts a reader of the
log needs to know what produced it, and the command that runs it again."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from runner.job.outputs import OutputFile
from runner.provenance.statement import RunEnd
from runner.units import human_duration

GROUP = "--- what ran"
MAX_LISTED = 50


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return human_duration(round(value)) if value >= 1 else f"{value:.1f}s"


def what_ran(*, job_id: str, trigger: Mapping[str, Any], facts: Mapping[str, Any],
             decision: Mapping[str, Any], outputs: Sequence[OutputFile], end: RunEnd,
             unmatched: Sequence[str] = ()) -> str:
    image = facts.get("image") or {}
    digest = f"sha256:{image['sha256']}" if image.get("sha256") else \
        f"signed by {image.get('signer')}" if image.get("signer") else "unknown"
    source = trigger.get("repository") or "the submitted directory"
    commit = trigger.get("commit")
    lines = [
        GROUP,
        f"image:     {image.get('name', '?')} ({image.get('path', '?')}) {digest}",
        f"source:    {source}" + (f" at {commit}" if commit else ""),
        f"grant:     {decision.get('grant')} spending account {decision.get('account')}",
    ]
    if end.slurm_ids:
        lines.append(f"slurm:     job {', '.join(end.slurm_ids)} on {end.node_list or '?'}")
    else:
        lines.append(f"host:      {end.node_list or '?'}")
    queue_wait = None if end.started_at is None else max(end.started_at - end.queued_at, 0.0)
    run_time = None if end.started_at is None else max(end.finished_at - end.started_at, 0.0)
    lines.append(f"timing:    waited {_seconds(queue_wait)}, ran {_seconds(run_time)}")
    if outputs:
        lines.append(f"outputs:   {len(outputs)} file(s), {sum(f.size for f in outputs)} bytes")
        lines += [f"  sha256:{f.sha256}  {f.path}" for f in outputs[:MAX_LISTED]]
        if len(outputs) > MAX_LISTED:
            lines.append(f"  ... and {len(outputs) - MAX_LISTED} more (hpc-runner show {job_id})")
    for path, why in end.left_out[:MAX_LISTED]:
        lines.append(f"  not collected: {path}: {why}")
    for pattern in unmatched:
        lines.append(f"  no file matched the output pattern {pattern!r}")
    lines.append(f"replay:    hpc-runner replay {job_id}")
    return "\n".join(lines) + "\n"
