"""What `hpc-runner show` says of a job: its provenance record read for a person, or, before it has
one, what the agent knows of it so far (README, "What did I run", lists the keys)."""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from collections.abc import Mapping
from typing import Any

from runner.agent import Agent, why_no_record
from runner.job import JobRecord
from runner.lifecycle.prepare import job_dir
from runner.lifecycle.recording import replay_link, trigger_of
from runner.provenance.facts import load_facts
from runner.provenance.statement import subjects

TRIGGER_KEYS = ("source", "repository", "commit", "ref", "event", "actor", "url")


def job_view(agent: Agent, record: JobRecord) -> dict[str, Any]:
    """The job as `show --json` prints it: the same keys whether or not it has a record."""
    data = agent.store.provenance(record.id)
    started = agent.store.started_times([record.id]).get(record.id)
    view: dict[str, Any] = {
        "id": record.id, "name": record.spec.get("name"), "state": str(record.state),
        "exit_status": record.exit_status, "detail": record.outcome_detail,
        "user": record.identity.get("user"), "source": record.source,
    }
    if data is not None:
        view |= _from_statement(json.loads(data))
        view |= {"recorded": True, "no_record": None,
                 "provenance_sha256": hashlib.sha256(data).hexdigest()}
    else:
        view |= _from_job(agent, record, started)
        view |= {"recorded": False, "no_record": why_no_record(record, started), "provenance_sha256": None}
    view["replay_command"] = replay_command(record, view["trigger"]) if data is not None else None
    return view


def _from_statement(statement: Mapping[str, Any]) -> dict[str, Any]:
    definition = _mapping(_mapping(statement.get("predicate")).get("buildDefinition"))
    details = _mapping(_mapping(statement.get("predicate")).get("runDetails"))
    external = _mapping(definition.get("externalParameters"))
    internal = _mapping(definition.get("internalParameters"))
    trigger = _mapping(external.get("trigger"))
    image: dict[str, Any] = {"name": None, "path": None, "sha256": None}
    for item in _list(definition.get("resolvedDependencies")):
        dependency = _mapping(item)
        if dependency.get("name") == "image":
            uri = str(dependency.get("uri") or "")
            image = {"name": _mapping(dependency.get("annotations")).get("name"),
                     "path": uri[len("file://"):] if uri.startswith("file://") else uri or None,
                     "sha256": _mapping(dependency.get("digest")).get("sha256")}
    byproducts = {str(_mapping(b).get("name")): _mapping(_mapping(b).get("annotations"))
                  for b in _list(details.get("byproducts"))}
    run = byproducts.get("run", {})
    replay_of = external.get("replay_of")
    return {
        "trigger": {key: trigger.get(key) for key in TRIGGER_KEYS},
        "grant": internal.get("grant"), "account": internal.get("account"),
        "slurm_account": internal.get("slurm_account"), "partition": internal.get("partition"),
        "image": image,
        "slurm_job_ids": list(_list(run.get("slurm_job_ids"))), "nodes": run.get("nodes"),
        "queue_wait_seconds": run.get("queue_wait_seconds"), "run_seconds": run.get("run_seconds"),
        "outputs": [f.to_json() for f in subjects(statement)],
        "outputs_left_out": [{"path": _mapping(item).get("path"), "why": _mapping(item).get("why")}
                             for item in _list(byproducts.get("outputs-left-out", {}).get("files"))],
        "replay_of": dict(replay_of) if isinstance(replay_of, Mapping) else None,
    }


def _from_job(agent: Agent, record: JobRecord, started: float | None) -> dict[str, Any]:
    """What is known of a job without a record: its admission, and what preparation wrote down."""
    facts = load_facts(job_dir(agent.config, record.id))
    decision = record.decision or {}
    slurm = _mapping(decision.get("slurm"))
    trigger = trigger_of(record, facts)
    name = record.spec.get("image")
    image = _mapping(facts.get("image"))
    if not image:
        listed = agent.policy.images.get(str(name))
        image = {"name": name, "path": listed.path if listed else None, "sha256": None}
    slurm_ids = [str(e.detail["slurm_id"]) for e in agent.store.audit_entries(job_id=record.id)
                 if e.action == "submitted" and e.detail.get("slurm_id")]
    if record.slurm_id and record.slurm_id not in slurm_ids:
        slurm_ids.append(record.slurm_id)
    end = record.finished_at if record.finished_at is not None else time.time()
    return {
        "trigger": {key: trigger.get(key) for key in TRIGGER_KEYS},
        "grant": decision.get("grant"), "account": decision.get("account"),
        "slurm_account": slurm.get("account"), "partition": slurm.get("partition"),
        "image": {key: image.get(key) for key in ("name", "path", "sha256")},
        "slurm_job_ids": slurm_ids, "nodes": record.node_list,
        "queue_wait_seconds": None if started is None else round(max(started - record.created_at, 0.0), 3),
        "run_seconds": None if started is None else round(max(end - started, 0.0), 3),
        "outputs": [], "outputs_left_out": [],
        "replay_of": replay_link(agent.store, record.id),
    }


def replay_command(record: JobRecord, trigger: Mapping[str, Any]) -> str:
    """The shell line that replays the job: from a checkout of its commit when it names one, else
    from the directory it was submitted from."""
    submitted = (record.decision or {}).get("submitted_workspace")
    commit = trigger.get("commit")
    if not commit:
        return shlex.join(["hpc-runner", "replay", record.id,
                           *(["--workdir", str(submitted)] if submitted else [])])
    repository = trigger.get("repository")
    if record.source == "local" and submitted:
        origin = str(submitted)
    elif record.source == "github" and repository:
        origin = f"https://github.com/{repository}.git"
    else:
        origin = str(repository or "REPOSITORY")
    directory = f"replay-{record.id}"
    return " && ".join([shlex.join(["git", "clone", origin, directory]),
                        shlex.join(["git", "-C", directory, "checkout", "--detach", str(commit)]),
                        shlex.join(["hpc-runner", "replay", record.id, "--workdir", directory])])


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
