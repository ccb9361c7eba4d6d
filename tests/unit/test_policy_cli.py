"""`hpc-runner policy check` and `hpc-runner policy explain`: output and exit statuses."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from runner.cli import main

POLICIES = Path(__file__).resolve().parents[2] / "policies"
EXAMPLES = POLICIES / "examples"
HPC_RUNNER = Path(sys.executable).with_name("hpc-runner")

DECISION_KEYS = {"allowed", "grant", "account", "slurm", "caps", "reasons", "notes", "principals", "image",
                 "sandbox",
                 "caches", "setup",
                 "retry_node_failure", "signed_fields", "waits"}


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def _explain(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    status = main(["policy", "explain", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


# --- check ----------------------------------------------------------------------------------------

def test_check_accepts_the_example_policies(capsys: pytest.CaptureFixture[str]) -> None:
    files = [POLICIES / f"{name}.toml" for name in ("research-group", "shared-cluster", "strict-site")]
    assert main(["policy", "check", *map(str, files)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"valid: {files[0]} (1 accounts, 1 images, 1 grants)",
        f"valid: {files[1]} (4 accounts, 3 images, 4 grants)",
        f"valid: {files[2]} (1 accounts, 1 images, 2 grants)",
    ]
    assert err == ""


def test_check_names_file_line_and_field_of_an_invalid_policy(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (POLICIES / "research-group.toml").read_text().replace("max_nodes = 4", "max_nodes = 0")
    bad = _write(tmp_path, "bad.toml", text)
    good = POLICIES / "strict-site.toml"
    assert main(["policy", "check", str(bad), str(good)]) == 1
    out, err = capsys.readouterr()
    line = next(n for n, row in enumerate(text.splitlines(), start=1) if row.startswith("max_nodes"))
    assert err == f"invalid: {bad}:{line}: accounts.clima.max_nodes: must be at least 1, got 0\n"
    assert out.startswith(f"valid: {good} ")


def test_check_reports_every_invalid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = _write(tmp_path, "one.toml", "version = 2\n")
    second = _write(tmp_path, "two.toml", "version = 1\n[[grants]]\nname = \n")
    assert main(["policy", "check", str(first), str(second)]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert errors[0] == f"invalid: {first}:1: version: this hpc-runner reads policy version 1, got 2"
    assert errors[1].startswith(f"invalid: {second}:3: invalid TOML: ")


def test_check_of_a_missing_file_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(tmp_path / "none.toml")]) == 1
    assert capsys.readouterr().err == f"invalid: {tmp_path / 'none.toml'}: no such file\n"


def test_check_needs_at_least_one_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["policy", "check"])
    assert caught.value.code == 2


# --- explain --------------------------------------------------------------------------------------

def test_explain_prints_an_allowed_decision_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _explain(capsys, "--policy", POLICIES / "research-group.toml",
                                "--job", EXAMPLES / "mpi-tests.toml",
                                "--identity", EXAMPLES / "alice-pr.json")
    decision = json.loads(out)
    assert (status, err) == (0, "")
    assert set(decision) == DECISION_KEYS
    assert (decision["allowed"], decision["grant"], decision["account"], decision["reasons"]) == (
        True, "clima-prs", "clima", [])
    assert decision["slurm"] == {"account": "esm", "partition": "expansion", "nodes": 2, "tasks": 8,
                                 "tasks_per_node": None, "cpus_per_task": 4, "gpus": 0, "memory": "16G",
                                 "time": "0-00:30:00", "time_seconds": 1800,
                                 "queue_time": "1d", "queue_time_seconds": 86400}


def test_explain_says_plainly_that_an_mpi_job_shares_the_host_network(
        capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = _explain(capsys, "--policy", POLICIES / "research-group.toml",
                         "--job", EXAMPLES / "mpi-tests.toml", "--identity", EXAMPLES / "alice-pr.json")
    decision = json.loads(out)
    assert decision["sandbox"] == {"mpi": True, "network": False, "gpus": False, "network_isolated": False}
    assert any("host's network namespace" in note for note in decision["notes"])


def test_explain_prints_a_denied_decision_and_exits_126(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _explain(capsys, "--policy", POLICIES / "research-group.toml",
                                "--job", EXAMPLES / "too-big.toml", "--identity", EXAMPLES / "alice-pr.json")
    decision = json.loads(out)
    assert (status, err) == (126, "")
    assert (decision["allowed"], decision["grant"], decision["slurm"]) == (False, None, None)
    assert len(decision["reasons"]) == 4


def test_explain_of_a_fork_pull_request_is_denied(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    identity = _write(tmp_path, "fork.json", json.dumps({
        "source": "github", "repository": "CliMA/ClimaAtmos.jl", "actor": "alice", "teams": ["CliMA/core"],
        "event": "pull_request", "ref": "refs/pull/15/head", "fork": True}))
    status, out, _ = _explain(capsys, "--policy", POLICIES / "research-group.toml",
                              "--job", EXAMPLES / "mpi-tests.toml", "--identity", identity)
    assert status == 126
    assert json.loads(out)["reasons"] == [
        "grant 'clima-prs': the job comes from a fork and the grant has forks = false"]


def test_explain_shows_a_grants_signed_fields_and_which_fields_a_buildkite_identity_has_signed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (POLICIES / "research-group.toml").read_text()
    policy = _write(tmp_path, "policy.toml",
                    text.replace("forks = false", 'forks = false\nsigned_fields = ["ref"]', 1))
    main_build = json.loads((EXAMPLES / "buildkite-main.json").read_text())
    asserted = _write(tmp_path, "asserted.json", json.dumps(main_build))
    signed = _write(tmp_path, "signed.json", json.dumps({**main_build, "signed": ["ref", "teams"]}))

    status, out, _ = _explain(capsys, "--policy", policy, "--job", EXAMPLES / "mpi-tests.toml",
                              "--identity", asserted)
    assert status == 126
    assert json.loads(out)["reasons"] == [
        "grant 'clima-prs': the job's ref is not signed (Buildkite asserts it); the grant requires "
        "signed_fields (ref)"]
    status, out, _ = _explain(capsys, "--policy", policy, "--job", EXAMPLES / "mpi-tests.toml",
                              "--identity", signed)
    assert (status, json.loads(out)["signed_fields"]) == (0, ["ref"])

    bad = _write(tmp_path, "bad.json", '{\n  "source": "buildkite",\n  "organization": "clima",\n'
                                       '  "pipeline": "p",\n  "signed": ["branch"]\n}\n')
    status, _, err = _explain(capsys, "--policy", policy, "--job", EXAMPLES / "mpi-tests.toml",
                              "--identity", bad)
    assert (status, err) == (1, f"invalid: {bad}:5: signed: must be a list of pipeline, ref, commit, event, "
                                "pull_request, teams\n")


def test_explain_names_file_line_and_field_of_an_invalid_job(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = _write(tmp_path, "job.toml", '[job]\nname = "x"\nimage = "clima-ci"\ncommand = ["a"]\n'
                                       "[job.resources]\nnodes = 0\n")
    status, out, err = _explain(capsys, "--policy", POLICIES / "research-group.toml", "--job", job,
                                "--identity", EXAMPLES / "alice-pr.json")
    assert (status, out) == (1, "")
    assert err == f"invalid: {job}:6: job.resources.nodes: must be at least 1, got 0\n"


def test_explain_names_file_line_and_field_of_an_invalid_policy(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (POLICIES / "research-group.toml").read_text().replace(
        'principals = ["github:team:CliMA/core"', 'principals = ["github:team:CliMA/c*"')
    policy = _write(tmp_path, "policy.toml", text)
    status, _, err = _explain(capsys, "--policy", policy, "--job", EXAMPLES / "mpi-tests.toml",
                              "--identity", EXAMPLES / "alice-pr.json")
    line = next(n for n, row in enumerate(text.splitlines(), start=1) if row.startswith("principals"))
    assert status == 1
    assert err.startswith(f"invalid: {policy}:{line}: grants[0].principals[0]: 'github:team:CliMA/c*': ")


def test_explain_names_file_line_and_field_of_an_invalid_identity(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    identity = _write(tmp_path, "id.json", '{\n  "source": "github",\n  "repository": "CliMA/x",\n'
                                           '  "fork": "no"\n}\n')
    status, _, err = _explain(capsys, "--policy", POLICIES / "research-group.toml",
                              "--job", EXAMPLES / "mpi-tests.toml", "--identity", identity)
    assert (status, err) == (1, f"invalid: {identity}:4: fork: must be true or false\n")


def test_explain_of_a_missing_job_file_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _explain(capsys, "--policy", POLICIES / "research-group.toml",
                              "--job", tmp_path / "none.toml")
    assert (status, err) == (1, f"invalid: {tmp_path / 'none.toml'}: no such file\n")


def test_explain_without_identity_uses_the_invoking_user_not_the_environment(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "someone-else")
    monkeypatch.setenv("LOGNAME", "someone-else")
    status, out, _ = _explain(capsys, "--policy", POLICIES / "research-group.toml",
                              "--job", EXAMPLES / "mpi-tests.toml")
    principals = json.loads(out)["principals"]
    assert status == 126
    assert principals[0] == f"local:user:{pwd.getpwuid(os.getuid()).pw_name}"
    assert "local:user:someone-else" not in principals


def test_explain_requires_policy_and_job(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["policy", "explain", "--job", str(EXAMPLES / "mpi-tests.toml")])
    assert caught.value.code == 2


# --- the installed command ------------------------------------------------------------------------

def test_installed_command_explains_a_denial_with_exit_126() -> None:
    result = subprocess.run(
        [str(HPC_RUNNER), "policy", "explain", "--policy", str(POLICIES / "research-group.toml"),
         "--job", str(EXAMPLES / "too-big.toml"), "--identity", str(EXAMPLES / "alice-pr.json")],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 126
    decision = json.loads(result.stdout)
    assert set(decision) == DECISION_KEYS
    assert decision["allowed"] is False
    assert "grant 'clima-prs': 16 nodes exceed account clima's max_nodes = 4" in decision["reasons"]


def test_installed_command_rejects_an_invalid_policy_with_exit_1(tmp_path: Path) -> None:
    policy = _write(tmp_path, "policy.toml", "version = 2\n")
    result = subprocess.run([str(HPC_RUNNER), "policy", "check", str(policy)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout) == (1, "")
    assert f"{policy}:1: version: this hpc-runner reads policy version 1, got 2" in result.stderr


def test_check_and_explain_take_gitlab_and_identity_provider_principals(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (POLICIES / "research-group.toml").read_text().replace(
        'principals = ["github:team:CliMA/core"',
        'principals = ["gitlab:group:clima", "idp:group:clima-staff", "github:team:CliMA/core"')
    policy = _write(tmp_path, "policy.toml", text)
    assert main(["policy", "check", str(policy)]) == 0
    capsys.readouterr()
    identity = _write(tmp_path, "gitlab.json", json.dumps({
        "source": "gitlab", "project": "clima/atmos/solver", "actor": "alice", "event": "pull_request",
        "ref": "refs/merge-requests/7/head", "commit": "c" * 40, "ref_protected": False}))
    status, out, _ = _explain(capsys, "--policy", policy, "--job", EXAMPLES / "mpi-tests.toml",
                              "--identity", identity)
    decision = json.loads(out)
    assert (status, decision["principals"]) == (126, [
        "gitlab:group:clima", "gitlab:group:clima/atmos", "gitlab:project:clima/atmos/solver",
        "gitlab:user:alice"])
    assert decision["reasons"] == ["grant 'clima-prs': ref 'refs/merge-requests/7/head' is not one of the "
                                   "grant's refs (refs/heads/main, refs/pull/*)"]
