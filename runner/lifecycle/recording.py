"""The end of a run, written down: its declared outputs collected into the job's directory, the
`--- what ran` group that ends its log, and its provenance record stored for good.

A job that never ran (refused, or cancelled while it waited) gets none of these. A record is
written once: an agent that restarts after it was stored only reads it back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runner.job import OUTPUTS_DIR, JobRecord, Outcome, OutputFile
from runner.job.prepared import PreparedJob
from runner.lifecycle.admission import log_path_of, workspace_of
from runner.lifecycle.notes import Notes
from runner.lifecycle.prepare import Site, job_dir
from runner.logging_setup import get_logger
from runner.logs.redact import redact_env
from runner.policy.model import DEFAULT_MAX_OUTPUT_BYTES
from runner.provenance.commit import head_commit
from runner.provenance.facts import REDACTED, load_facts, run_facts, save_facts
from runner.provenance.outputs import Collected, collect_outputs
from runner.provenance.statement import RunEnd, build_statement, canonical, left_out, subjects
from runner.provenance.whatran import what_ran
from runner.store import Store

log = get_logger("runner.lifecycle")

RECORDED_ACTION = "provenance_recorded"
# The audit entry that makes a job the replay of another (written at its admission).
REPLAY_ACTION = "replay_of"


def redacted_vars(site: Site) -> tuple[str, ...]:
    """The name patterns whose values a record never holds: those that redact logs (beside the
    defaults, `*_TOKEN`, `*_SECRET`, `*_PASSWORD`..., which apply to every source)."""
    config = site.config
    return config.buildkite.redacted_vars if config.buildkite is not None else ()


def save_run_facts(site: Site, prepared: PreparedJob, *, executor: str) -> None:
    """Write down what the prepared job is made of, for its record (`runner.provenance.facts`).
    Secrets are replaced by the patterns that redact logs, the defaults for every source."""
    config = site.config
    facts = run_facts(image=prepared.image, env=prepared.plan.env, redacted_vars=redacted_vars(site),
                      mpi=site.host_mpi() if prepared.decision.mpi else None, executor=executor,
                      apptainer=config.sandbox.apptainer, slurm="sbatch" if executor == "slurm" else None,
                      cache=site.digest_cache())
    facts["workspace_commit"] = head_commit(prepared.workspace)
    save_facts(prepared.job_dir, facts)


def recorded_left_out(store: Store, job_id: str) -> tuple[tuple[str, str], ...]:
    """The files a job's stored record says were not collected, with why; none before it has one."""
    stored = store.provenance(job_id)
    return tuple(left_out(json.loads(stored))) if stored is not None else ()


def recorded_outputs(store: Store, job_id: str) -> tuple[OutputFile, ...]:
    """The outputs a job's stored record names; none before it has one."""
    stored = store.provenance(job_id)
    return tuple(subjects(json.loads(stored))) if stored is not None else ()


def trigger_of(record: JobRecord, facts: Mapping[str, Any]) -> dict[str, Any]:
    """What started the run, as its source verified it: the record's identity, and the commit of
    a submitted directory that was a git checkout."""
    identity = record.identity
    repository = identity.get("repository") or identity.get("project")
    if identity.get("pipeline"):
        repository = repository or f"{identity.get('organization')}/{identity.get('pipeline')}"
    return {
        "source": record.source,
        "repository": repository,
        "commit": identity.get("commit") or facts.get("workspace_commit"),
        "ref": identity.get("ref") or identity.get("branch"),
        "event": identity.get("event"),
        "actor": identity.get("actor") or identity.get("creator") or identity.get("user"),
        "url": record.source_url,
        "external_id": record.external_id,
    }


def replay_link(store: Store, job_id: str) -> dict[str, Any] | None:
    for entry in store.audit_entries(job_id=job_id):
        if entry.action == REPLAY_ACTION:
            return dict(entry.detail)
    return None


def _sha256_of(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as handle:
            while block := handle.read(1024 * 1024):
                digest.update(block)
                size += len(block)
    except FileNotFoundError:
        pass
    return digest.hexdigest(), size


def _fresh_line(log_path: Path) -> str:
    try:
        with open(log_path, "rb") as handle:
            if handle.seek(0, 2) == 0:
                return ""
            handle.seek(-1, 2)
            return "" if handle.read(1) == b"\n" else "\n"
    except OSError:
        return ""


def _slurm_ids(store: Store, record: JobRecord) -> tuple[str, ...]:
    ids = [str(entry.detail.get("slurm_id")) for entry in store.audit_entries(job_id=record.id)
           if entry.action == "submitted" and entry.detail.get("slurm_id")]
    if record.slurm_id and record.slurm_id not in ids:
        ids.append(record.slurm_id)
    return tuple(ids)


def _ran(started: float | None, record: JobRecord, outcome: Outcome) -> bool:
    """Whether the job ran: seen running or given nodes, or ended as only a job that ran ends
    (one that started and ended between two looks at Slurm, or while no agent watched)."""
    return started is not None or record.node_list is not None or outcome.exit_status is not None \
        or outcome.state in ("succeeded", "failed", "timed_out")


async def record_run(site: Site, store: Store, record: JobRecord, outcome: Outcome, *, notes: Notes,
                     actor: str) -> tuple[OutputFile, ...]:
    """Collect the job's outputs, end its log with what ran and store its provenance record; the
    outputs collected. Nothing for a job that never ran."""
    if store.provenance(record.id) is not None:
        return recorded_outputs(store, record.id)
    started = store.started_times([record.id]).get(record.id)
    if not _ran(started, record, outcome):
        return ()
    directory = job_dir(site.config, record.id)
    facts = load_facts(directory)
    decision = record.decision or {}
    patterns = [p for p in record.spec.get("outputs") or [] if isinstance(p, str)]
    max_bytes = (decision.get("caps") or {}).get("max_output_bytes", DEFAULT_MAX_OUTPUT_BYTES)
    collected = await asyncio.to_thread(collect_outputs, workspace_of(record), patterns,
                                        directory / OUTPUTS_DIR, max_bytes=int(max_bytes)) \
        if patterns else Collected()
    trigger = trigger_of(record, facts)
    log_path = log_path_of(site, record)

    def end(log_sha256: str, log_size: int) -> RunEnd:
        return RunEnd(state=outcome.state, exit_status=outcome.exit_status, detail=outcome.detail,
                      slurm_ids=_slurm_ids(store, record), node_list=record.node_list,
                      queued_at=record.created_at, started_at=started, finished_at=finished,
                      log_sha256=log_sha256, log_size=log_size, left_out=collected.left_out)

    finished = time.time()
    # The group starts on a line of its own, whatever the job's last write ended with.
    group = what_ran(job_id=record.id, trigger=trigger, facts=facts, decision=decision,
                     outputs=collected.files, end=end("", 0), unmatched=collected.unmatched)
    notes(log_path, _fresh_line(log_path) + group)
    log_sha256, log_size = await asyncio.to_thread(_sha256_of, log_path)
    # The job's own env, as submitted, with the same values replaced as in the environment.
    spec = {**record.spec, "env": redact_env(record.spec.get("env") or {}, redacted_vars(site), REDACTED)}
    statement = build_statement(
        job_id=record.id, agent=socket.gethostname(), spec=spec, trigger=trigger, facts=facts,
        decision=decision, outputs=collected.files, end=end(log_sha256, log_size),
        replay_of=replay_link(store, record.id))
    data = canonical(statement)
    if store.save_provenance(record.id, data):
        detail = {"sha256": hashlib.sha256(data).hexdigest(), "outputs": len(collected.files),
                  "output_bytes": collected.total_bytes, "left_out": len(collected.left_out)}
        store.append_audit(actor=actor, action=RECORDED_ACTION, job_id=record.id, detail=detail)
        log.info("provenance recorded", job=record.id, outputs=len(collected.files))
    return collected.files
