"""`hpc-runner audit`: the audit log joined with the jobs it is about, as lines or JSON lines, from a
real store."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.cli import main
from runner.commands.audit import KEYS, parse_since, write_trail
from runner.errors import InputError
from runner.job import JobState
from runner.store import Store

GITHUB = {"source": "github", "repository": "ocean-lab/model", "actor": "erin", "event": "push",
          "ref": "refs/heads/main", "commit": "a" * 40}
LOCAL = {"source": "local", "user": "alice", "groups": ["esm"]}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\nwork_root = "{tmp_path / "work"}"\n')
    return path


@pytest.fixture
def store(config: Path) -> Iterator[Store]:
    opened = Store.open(config.parent / "state")
    yield opened
    opened.close()


def add(store: Store, identity: dict[str, object], account: str, *, slurm_id: str | None = None,
        end: JobState = JobState.succeeded) -> str:
    job = store.add_job(source=str(identity["source"]), identity=identity, spec={"name": "j"})
    store.record_decision(job.id, actor="github:user:erin" if identity is GITHUB else "local:user:alice",
                          decision={"allowed": True, "grant": f"{account}-members", "account": account})
    if slurm_id is not None:
        store.set_slurm_id(job.id, slurm_id, "slurm")
    store.set_state(job.id, JobState.running)
    store.set_state(job.id, end, exit_status=0 if end == JobState.succeeded else 3)
    return job.id


def lines(store: Store, **kw: object) -> list[dict[str, object]]:
    out = io.StringIO()
    write_trail(store, out, as_json=True, **kw)  # type: ignore[arg-type]
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_lines_name_who_through_which_grant_spent_which_account(store: Store) -> None:
    github_job = add(store, GITHUB, "ocean", slurm_id="4242", end=JobState.failed)
    store.append_audit(actor="agent", action="policy_reload", detail={"ok": True})
    found = lines(store)
    assert all(list(item) == list(KEYS) for item in found)
    decision = next(item for item in found if item["action"] == "decision")
    assert decision["job_id"] == github_job
    assert decision["actor"] == "github:user:erin"
    assert (decision["source"], decision["principal"], decision["grant"], decision["account"]) == \
        ("github", "github:user:erin", "ocean-members", "ocean")
    assert (decision["slurm_id"], decision["state"], decision["exit_status"]) == ("4242", "failed", 3)
    reload = found[-1]
    assert reload["action"] == "policy_reload" and reload["job_id"] is None and reload["account"] is None
    time = dt.datetime.fromisoformat(str(decision["time"]))
    assert str(decision["time"]).endswith("Z") and time.utcoffset() == dt.timedelta(0)
    assert [item["seq"] for item in found] == sorted(item["seq"] for item in found)  # type: ignore[type-var]


def test_filters_by_job_account_and_time(store: Store) -> None:
    ocean = add(store, GITHUB, "ocean")
    esm = add(store, LOCAL, "esm")
    assert {item["job_id"] for item in lines(store, job_id=esm)} == {esm}
    assert {item["job_id"] for item in lines(store, account="ocean")} == {ocean}
    assert lines(store, since=dt.datetime.now(dt.UTC).timestamp() + 3600) == []
    assert len(lines(store, since=0.0)) == len(lines(store))


def test_a_readable_line_per_entry(store: Store) -> None:
    job_id = add(store, LOCAL, "esm")
    out = io.StringIO()
    count = write_trail(store, out, job_id=job_id)
    text = out.getvalue().splitlines()
    assert count == len(text) == 3
    assert f"decision job {job_id} by local:user:alice [source local, principal local:user:alice, grant " \
           "esm-members, account esm, now succeeded (exit 0)]" in text[0]


def test_since_takes_a_date_or_an_rfc3339_time() -> None:
    assert parse_since("2026-12-01") == dt.datetime(2026, 12, 1, tzinfo=dt.UTC).timestamp()
    assert parse_since("2026-12-01T09:00:00+01:00") == dt.datetime(2026, 12, 1, 8, tzinfo=dt.UTC).timestamp()
    assert parse_since("2026-12-01T08:00:00Z") == parse_since("2026-12-01T09:00:00+01:00")


@pytest.mark.parametrize("bad", ["yesterday", "2026-13-01", "2026-12-01T08:00:00", "12/01/2026"])
def test_a_bad_since_is_refused_naming_it(bad: str) -> None:
    with pytest.raises(InputError, match=f"--since {bad!r} is neither a date"):
        parse_since(bad)


def test_the_command_prints_json_lines_and_refuses_a_bad_since(
        store: Store, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job_id = add(store, LOCAL, "esm")
    assert main(["audit", "--config", str(config), "--json", "--job", job_id, "--since", "2000-01-01"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [item["action"] for item in printed] == ["decision", "state", "state"]
    assert main(["audit", "--config", str(config), "--since", "soon"]) == 1
    assert "--since 'soon' is neither a date" in capsys.readouterr().err


def test_the_command_as_another_account_says_who_may_read_the_state(
        store: Store, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the state dir to another account")
    state_dir = config.parent / "state"
    os.chown(state_dir, 65534, 65534)
    try:
        assert main(["audit", "--config", str(config)]) == 1
    finally:
        os.chown(state_dir, 0, 0)
    assert "belongs to nobody: only nobody, the agent's account, may read it (run `sudo -u nobody " \
           "hpc-runner audit" in capsys.readouterr().err


def test_the_command_without_a_state_dir_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'state_dir = "{tmp_path / "none"}"\n')
    assert main(["audit", "--config", str(path)]) == 1
    assert "no state dir at" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
