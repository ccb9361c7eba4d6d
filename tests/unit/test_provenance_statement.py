"""The provenance record and the `--- what ran` group, from fixed inputs (pure).

The record's exact shape is the golden file `golden/provenance-statement.json` (its canonical
bytes are what is stored); `UPDATE_GOLDEN=1` rewrites it (review the diff). Every record built
here also passes the in-toto Statement v1 and SLSA provenance v1 checks of `attestation`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from attestation import validate_record
from conftest import check_golden

from runner.job.outputs import OutputFile
from runner.provenance.statement import RunEnd, build_statement, canonical, left_out, subjects
from runner.provenance.whatran import MAX_LISTED, what_ran

GOLDEN = Path(__file__).with_name("golden") / "provenance-statement.json"
JOB_ID = "7q3vx0k2"
COMMIT = "4f1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c"
IMAGE_SHA256 = hashlib.sha256(b"the image").hexdigest()
LOG_SHA256 = hashlib.sha256(b"the log").hexdigest()

SPEC: dict[str, Any] = {
    "name": "ocean-model", "image": "test", "command": None, "script": "./run.sh\n",
    "env": {"MODEL_RES": "0.25", "API_TOKEN": "[REDACTED]"}, "binds": [], "network": False, "mpi": True,
    "outputs": ["results/**/*.nc", "plots/*.png"],
    "resources": {"account": "esm", "partition": "debug", "nodes": 1, "tasks": 2, "tasks_per_node": None,
                  "cpus_per_task": 1, "gpus": None, "memory_mb": 1024, "time_seconds": 600},
}
TRIGGER: dict[str, Any] = {
    "source": "github", "repository": "ocean-lab/model", "commit": COMMIT, "ref": "refs/heads/main",
    "event": "push", "actor": "erin", "url": "https://github.com/ocean-lab/model/commit/" + COMMIT,
    "external_id": "check-run-99",
}
FACTS: dict[str, Any] = {
    "image": {"name": "test", "path": "/images/test.sif", "sha256": IMAGE_SHA256, "signer": None},
    "environment": {"MODEL_RES": "0.25", "API_TOKEN": "[REDACTED]", "PATH": "/usr/bin:/bin"},
    "host_mpi": {"family": "openmpi", "version": "4.1.6",
                 "libraries": [{"path": "/usr/lib/x86_64-linux-gnu/libmpi.so.40",
                                "sha256": hashlib.sha256(b"libmpi").hexdigest()}]},
    "versions": {"hpc-runner": "0.1.0", "apptainer": "1.4.5", "slurm": "24.11.1"},
    "executor": "slurm",
}
DECISION: dict[str, Any] = {
    "grant": "esm-members", "account": "esm", "principals": ["github:repo:ocean-lab/model"],
    "slurm": {"account": "esm", "partition": "debug"}, "caps": {"max_output_bytes": 1048576},
}
OUTPUTS = (OutputFile("plots/sst.png", hashlib.sha256(b"png").hexdigest(), 3),
           OutputFile("results/2026/sst.nc", hashlib.sha256(b"netcdf").hexdigest(), 6))
END = RunEnd(state="succeeded", exit_status=0, detail="exit status 0", slurm_ids=("41", "42"),
             node_list="node01", queued_at=1_780_000_000.0, started_at=1_780_000_012.25,
             finished_at=1_780_000_100.5, log_sha256=LOG_SHA256, log_size=2048,
             left_out=(("results/huge.nc", "2000000 bytes would pass max_output_bytes"),))
REPLAY_OF = {"job_id": "0abc1234", "provenance_sha256": hashlib.sha256(b"the original record").hexdigest()}


def statement(**changes: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {"job_id": JOB_ID, "agent": "login01", "spec": SPEC, "trigger": TRIGGER,
                                 "facts": FACTS, "decision": DECISION, "outputs": OUTPUTS, "end": END,
                                 "replay_of": REPLAY_OF}
    return build_statement(**{**arguments, **changes})


def test_the_record_of_a_fixed_run_is_the_golden_one() -> None:
    data = canonical(statement())
    pretty = json.dumps(json.loads(data), indent=2, sort_keys=True) + "\n"
    check_golden(GOLDEN, pretty, "the provenance record")
    validate_record(data)


def test_the_stored_bytes_are_rfc8785_whatever_order_the_fields_were_built_in() -> None:
    data = canonical(statement())
    # Sorted keys, no spaces, one form per number: what JSON with sorted keys and no spaces
    # gives for this record (its numbers are integers and short decimals).
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False).encode()
    reordered = json.loads(json.dumps(statement()), object_pairs_hook=lambda pairs: dict(reversed(pairs)))
    assert canonical(reordered) == data == rfc8785.dumps(json.loads(data))
    assert b"\n" not in data and b": " not in data


def test_subjects_give_back_the_outputs_in_order() -> None:
    assert subjects(json.loads(canonical(statement()))) == list(OUTPUTS)


def test_left_out_gives_back_the_files_not_collected_and_why() -> None:
    assert left_out(json.loads(canonical(statement()))) == list(END.left_out)
    assert left_out(json.loads(canonical(statement(end=RunEnd(**{**END.__dict__, "left_out": ()}))))) == []
    # A record is data: a byproduct of another shape gives nothing rather than an error.
    assert left_out({"predicate": {"runDetails": {"byproducts": [
        {"name": "outputs-left-out", "annotations": {"files": [{"path": 3}, "x"]}}]}}}) == []


def test_a_run_without_outputs_has_its_log_as_the_one_subject_and_no_outputs() -> None:
    record = statement(outputs=(), replay_of=None)
    data = canonical(record)
    validate_record(data)
    assert record["subject"] == [{"name": "log", "uri": f"urn:hpc-runner:job:{JOB_ID}:log",
                                  "digest": {"sha256": LOG_SHA256}, "annotations": {"size": 2048}}]
    assert subjects(json.loads(data)) == []
    assert "replay_of" not in record["predicate"]["buildDefinition"]["externalParameters"]


def test_a_run_that_never_started_running_still_validates() -> None:
    # Cancelled between Slurm's acceptance and its start: no start time, no node, no exit status.
    end = RunEnd(state="cancelled", exit_status=None, detail="cancelled", slurm_ids=("43",), node_list=None,
                 queued_at=1_780_000_000.0, started_at=None, finished_at=1_780_000_005.0,
                 log_sha256=LOG_SHA256, log_size=10)
    record = statement(outputs=(), end=end, facts={}, trigger={"source": "local"}, decision={})
    validate_record(canonical(record))
    run = record["predicate"]["runDetails"]["byproducts"][1]["annotations"]
    assert (run["queue_wait_seconds"], run["run_seconds"], run["exit_status"]) == (None, None, None)
    assert record["predicate"]["runDetails"]["metadata"]["startedOn"] == "2026-05-28T20:26:40.000000Z"


def test_the_validator_refuses_what_the_definitions_do_not_allow() -> None:
    good = json.loads(canonical(statement()))

    def refused(change: Any) -> None:
        document = json.loads(json.dumps(good))
        change(document)
        with pytest.raises((AssertionError, ValueError)):
            validate_record(rfc8785.dumps(document))

    refused(lambda d: d.update(subject=[]))
    refused(lambda d: d["subject"][0].update(digest={}))
    refused(lambda d: d["subject"][0].update(digest={"sha256": "NOT-HEX"}))
    refused(lambda d: d["predicate"].update(extra=1))
    refused(lambda d: d["predicate"].update(build_definition=d["predicate"].pop("buildDefinition")))
    refused(lambda d: d["predicate"]["runDetails"]["metadata"].update(startedOn="yesterday"))
    refused(lambda d: d.update(_type="https://in-toto.io/Statement/v0.1"))
    with pytest.raises(AssertionError):
        validate_record(json.dumps(good, indent=1).encode())  # not canonical


# -- the what-ran group --------------------------------------------------------------------------


WHAT_RAN = f"""--- what ran
image:     test (/images/test.sif) sha256:{IMAGE_SHA256}
source:    ocean-lab/model at {COMMIT}
grant:     esm-members spending account esm
slurm:     job 41, 42 on node01
timing:    waited 12s, ran 1m28s
outputs:   2 file(s), 9 bytes
  sha256:{OUTPUTS[0].sha256}  plots/sst.png
  sha256:{OUTPUTS[1].sha256}  results/2026/sst.nc
  not collected: results/huge.nc: 2000000 bytes would pass max_output_bytes
  no file matched the output pattern 'logs/*.txt'
replay:    hpc-runner replay {JOB_ID}
"""


def test_the_what_ran_group_of_a_fixed_run() -> None:
    text = what_ran(job_id=JOB_ID, trigger=TRIGGER, facts=FACTS, decision=DECISION, outputs=OUTPUTS, end=END,
                    unmatched=("logs/*.txt",))
    assert text == WHAT_RAN


def test_the_what_ran_group_of_a_local_run_without_a_checkout_or_outputs() -> None:
    end = RunEnd(state="failed", exit_status=1, detail="exit status 1", slurm_ids=(), node_list="login01",
                 queued_at=100.0, started_at=100.25, finished_at=100.75, log_sha256="", log_size=0)
    facts = {"image": {"name": "test", "path": "/i.sif", "signer": "ci@example.org"}}
    text = what_ran(job_id="j1", trigger={"source": "local"}, facts=facts,
                    decision={"grant": "g", "account": "a"}, outputs=(), end=end)
    assert text == ("--- what ran\n"
                    "image:     test (/i.sif) signed by ci@example.org\n"
                    "source:    the submitted directory\n"
                    "grant:     g spending account a\n"
                    "host:      login01\n"
                    "timing:    waited 0.2s, ran 0.5s\n"
                    "replay:    hpc-runner replay j1\n")


def test_the_what_ran_group_lists_at_most_max_listed_outputs_and_says_how_to_see_the_rest() -> None:
    many = tuple(OutputFile(f"f{i:03}", "0" * 64, 1) for i in range(MAX_LISTED + 5))
    text = what_ran(job_id=JOB_ID, trigger=TRIGGER, facts=FACTS, decision=DECISION, outputs=many, end=END)
    listed = [line for line in text.splitlines() if line.startswith("  sha256:")]
    assert len(listed) == MAX_LISTED
    assert f"  ... and 5 more (hpc-runner show {JOB_ID})" in text.splitlines()
