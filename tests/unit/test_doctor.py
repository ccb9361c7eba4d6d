"""`hpc-runner doctor` and the secret-file rules it enforces."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import binds_policy
from fakes.buildkite_signer import StepSigner

from runner.commands.doctor import run_doctor
from runner.config import AgentConfig, parse_config_text
from runner.doctor import (
    COMMAND_TIMEOUT,
    Check,
    CommandResult,
    Host,
    doctor,
    exit_status,
    render_text,
    run_checks,
)
from runner.secrets import SecretFileError, check_not_writable_by_others, read_secret_file

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
NOBODY = 65534


# --- a fake host -----------------------------------------------------------------------------------


class FakeHost:
    """Programs on PATH and what each command line prints; anything else is "not found"."""

    def __init__(self, tools: dict[str, str], outputs: dict[tuple[str, ...], CommandResult]) -> None:
        self.tools = tools
        self.outputs = outputs
        self.calls: list[tuple[str, ...]] = []

    def which(self, name: str) -> str | None:
        return self.tools.get(name)

    def run(self, argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT,
            input: str | None = None) -> CommandResult:
        assert timeout <= COMMAND_TIMEOUT
        self.calls.append(tuple(argv))
        return self.outputs.get(tuple(argv), CommandResult(None, "", f"{argv[0]}: not found"))

    def host(self) -> Host:
        return Host(which=self.which, run=self.run)

    def without(self, *names: str) -> FakeHost:
        return FakeHost({k: v for k, v in self.tools.items() if k not in names}, self.outputs)

    def answering(self, argv: tuple[str, ...], result: CommandResult) -> FakeHost:
        return FakeHost(self.tools, {**self.outputs, argv: result})


def healthy_cluster() -> FakeHost:
    tools = {name: f"/usr/bin/{name}" for name in ("apptainer", "sbatch", "squeue", "scancel", "scontrol",
                                                   "munge", "unmunge", "mpirun", "ompi_info")}
    outputs = {
        ("/usr/bin/apptainer", "--version"): CommandResult(0, "apptainer version 1.4.5\n"),
        ("squeue", "--version"): CommandResult(0, "slurm 23.11.4\n"),
        ("scontrol", "ping"): CommandResult(0, "Slurmctld(primary) at ctl is UP\n"),
        ("munge", "-n"): CommandResult(0, "MUNGE:AwQDAAB=:\n"),
        ("unmunge",): CommandResult(0, "STATUS: Success (0)\n"),
        ("/usr/bin/mpirun", "--version"): CommandResult(0, "mpirun (Open MPI) 4.1.4\n\nReport bugs to ...\n"),
        ("ompi_info", "--parsable", "--path", "prefix"): CommandResult(0, "path:prefix:/usr\n"),
    }
    return FakeHost(tools, outputs)


def slurm_site(tmp_path: Path, extra: str = "", executor: str = "slurm") -> AgentConfig:
    state = tmp_path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    return parse_config_text(f'state_dir = "{state}"\nwork_root = "{tmp_path}/work"\n'
                             f'executor = "{executor}"\n{extra}')


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


# --- the whole run -------------------------------------------------------------------------------


def test_a_healthy_site_passes_every_check(tmp_path: Path) -> None:
    checks = run_checks(slurm_site(tmp_path), healthy_cluster().host())
    found = by_name(checks)
    # pytest's tmp_path lies in /tmp, which the work_root check rightly calls node-local.
    assert found.pop("work_root").status in ("ok", "warn")
    assert [c.status for c in found.values()] == ["ok"] * len(found), render_text(checks)
    assert found["apptainer"].detail == "Apptainer 1.4.5 at /usr/bin/apptainer"
    assert found["mpi"].detail == "Open MPI 4.1.4, prefix /usr"
    assert found["slurmctld"].detail == "Slurmctld(primary) at ctl is UP"
    assert exit_status(checks) == 0


def test_missing_apptainer_fails_with_a_fix_line(tmp_path: Path) -> None:
    checks = run_checks(slurm_site(tmp_path), healthy_cluster().without("apptainer").host())
    apptainer = by_name(checks)["apptainer"]
    assert apptainer.status == "FAIL"
    assert apptainer.fix is not None
    assert "deploy/dev/setup.sh" in apptainer.fix
    lines = render_text(checks).splitlines()
    failing = lines.index("FAIL  apptainer: 'apptainer' not found on PATH")
    assert lines[failing + 1].startswith("      fix: install Apptainer >= 1.3")
    assert exit_status(checks) == 1


def test_the_configured_apptainer_path_is_the_one_checked(tmp_path: Path) -> None:
    fake = healthy_cluster()
    fake.tools["/opt/apptainer/bin/apptainer"] = "/opt/apptainer/bin/apptainer"
    fake.outputs[("/opt/apptainer/bin/apptainer", "--version")] = CommandResult(0, "apptainer version 1.3.6")
    config = slurm_site(tmp_path, '[sandbox]\napptainer = "/opt/apptainer/bin/apptainer"\n')
    assert by_name(run_checks(config, fake.host()))["apptainer"].detail.startswith("Apptainer 1.3.6 at /opt")


def test_old_apptainer_is_a_warning_and_warnings_still_exit_zero(tmp_path: Path) -> None:
    fake = healthy_cluster().answering(("/usr/bin/apptainer", "--version"),
                                       CommandResult(0, "apptainer version 1.2.5\n"))
    checks = run_checks(slurm_site(tmp_path), fake.host())
    assert by_name(checks)["apptainer"].status == "warn"
    assert "1.2.5" in by_name(checks)["apptainer"].detail
    assert exit_status(checks) == 0


def test_broken_apptainer_fails(tmp_path: Path) -> None:
    fake = healthy_cluster().answering(("/usr/bin/apptainer", "--version"),
                                       CommandResult(127, "", "error while loading shared libraries: libc"))
    apptainer = by_name(run_checks(slurm_site(tmp_path), fake.host()))["apptainer"]
    assert apptainer.status == "FAIL"
    assert "shared libraries" in apptainer.detail


# --- slurm and munge -----------------------------------------------------------------------------


def test_missing_slurm_fails_only_for_the_slurm_executor(tmp_path: Path) -> None:
    fake = healthy_cluster().without("sbatch", "scontrol", "squeue")
    slurm = by_name(run_checks(slurm_site(tmp_path), fake.host()))
    assert slurm["slurm"].status == "FAIL"
    assert "sbatch, squeue, scontrol" in slurm["slurm"].detail
    assert slurm["slurmctld"].status == "FAIL"
    local = by_name(run_checks(slurm_site(tmp_path, executor="local"), fake.host()))
    assert local["slurm"].status == "warn"
    assert "not needed with executor 'local'" in local["slurm"].detail


def test_slurm_without_configuration_fails(tmp_path: Path) -> None:
    fatal = "squeue: fatal: Could not establish a configuration source"
    fake = healthy_cluster().answering(("squeue", "--version"), CommandResult(1, "", fatal))
    slurm = by_name(run_checks(slurm_site(tmp_path), fake.host()))["slurm"]
    assert slurm.status == "FAIL"
    assert "Could not establish a configuration source" in slurm.detail
    assert slurm.fix is not None
    assert "SLURM_CONF" in slurm.fix


def test_controller_timeout_fails_without_asking_twice(tmp_path: Path) -> None:
    fake = healthy_cluster().answering(("scontrol", "ping"),
                                       CommandResult(None, "", "scontrol did not answer within 10 s"))
    controller = by_name(run_checks(slurm_site(tmp_path), fake.host()))["slurmctld"]
    assert controller.status == "FAIL"
    assert "did not answer within 10 s" in controller.detail
    assert ("squeue", "-h", "-o", "%i") not in fake.calls


def test_controller_reached_through_squeue_when_ping_fails(tmp_path: Path) -> None:
    fake = (healthy_cluster()
            .answering(("scontrol", "ping"), CommandResult(1, "Slurmctld(primary) at ctl is DOWN\n"))
            .answering(("squeue", "-h", "-o", "%i"), CommandResult(0, "12\n13\n")))
    assert by_name(run_checks(slurm_site(tmp_path), fake.host()))["slurmctld"].status == "ok"


def test_munge_failure_fails_for_slurm(tmp_path: Path) -> None:
    fake = healthy_cluster().answering(("munge", "-n"), CommandResult(
        1, "", 'munge: Error: Failed to access "/run/munge/munge.socket.2" (Did you start munged?)'))
    munge = by_name(run_checks(slurm_site(tmp_path), fake.host()))["munge"]
    assert munge.status == "FAIL"
    assert "Did you start munged?" in munge.detail
    assert munge.fix is not None
    assert "systemctl start munge" in munge.fix


def test_munge_decoding_gets_the_credential(tmp_path: Path) -> None:
    seen: list[str | None] = []
    fake = healthy_cluster()

    def run(argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT,
            input: str | None = None) -> CommandResult:
        if tuple(argv) == ("unmunge",):
            seen.append(input)
        return fake.run(argv, timeout=timeout, input=input)

    run_checks(slurm_site(tmp_path), Host(which=fake.which, run=run))
    assert seen == ["MUNGE:AwQDAAB=:\n"]


# --- MPI -----------------------------------------------------------------------------------------

MPICH_VERSION = "HYDRA build details:\n    Version:                                 4.0.2\n"
INTEL_VERSION = "Intel(R) MPI Library for Linux* OS, Version 2021.6 Build 20220227 (id: 28877f3f32)\n"


@pytest.mark.parametrize(("output", "family"), [(MPICH_VERSION, "MPICH"), (INTEL_VERSION, "Intel MPI")])
def test_other_mpi_families_are_reported_unsupported(tmp_path: Path, output: str, family: str) -> None:
    fake = healthy_cluster().without("ompi_info").answering(("/usr/bin/mpirun", "--version"),
                                                            CommandResult(0, output))
    mpi = by_name(run_checks(slurm_site(tmp_path), fake.host()))["mpi"]
    assert mpi.status == "warn"
    assert mpi.detail.startswith(f"{family} found (/usr/bin/mpirun): unsupported")
    assert "Open MPI" in mpi.detail
    assert "MPI jobs will be refused" in mpi.detail
    # Named in the config, Open MPI is required: another MPI is then a failure.
    config = slurm_site(tmp_path, '[mpi]\nimplementation = "openmpi"\n')
    assert by_name(run_checks(config, fake.host()))["mpi"].status == "FAIL"


def test_missing_mpi_is_a_warning(tmp_path: Path) -> None:
    checks = run_checks(slurm_site(tmp_path), healthy_cluster().without("mpirun", "ompi_info").host())
    mpi = by_name(checks)["mpi"]
    assert mpi.status == "warn"
    assert "MPI jobs will be refused" in mpi.detail
    assert exit_status(checks) == 0


def test_open_mpi_found_through_ompi_info_alone(tmp_path: Path) -> None:
    fake = healthy_cluster().without("mpirun").answering(("ompi_info", "--version"),
                                                         CommandResult(0, "Open MPI v5.0.3\n"))
    mpi = by_name(run_checks(slurm_site(tmp_path), fake.host()))["mpi"]
    assert mpi.detail == "Open MPI 5.0.3, prefix /usr"


def test_mpi_switched_off(tmp_path: Path) -> None:
    config = slurm_site(tmp_path, '[mpi]\nimplementation = "none"\n')
    fake = healthy_cluster()
    assert by_name(run_checks(config, fake.host()))["mpi"].status == "ok"
    assert not any("mpirun" in call[0] for call in fake.calls)


# --- state_dir and work_root ---------------------------------------------------------------------


def test_a_group_readable_state_dir_fails_with_chmod_700(tmp_path: Path) -> None:
    config = slurm_site(tmp_path)
    config.state_dir.chmod(0o750)
    checks = run_checks(config, healthy_cluster().host())
    state = by_name(checks)["state_dir"]
    assert state.status == "FAIL"
    assert "mode 0750" in state.detail
    assert state.fix == f"chmod 700 {config.state_dir}"
    assert f"      fix: chmod 700 {config.state_dir}" in render_text(checks).splitlines()
    assert exit_status(checks) == 1


def test_a_missing_state_dir_with_a_writable_parent_will_be_created(tmp_path: Path) -> None:
    config = parse_config_text(f'state_dir = "{tmp_path}/new/state"\n')
    state = by_name(run_checks(config, healthy_cluster().host()))["state_dir"]
    assert state.status == "ok"
    assert "will be created" in state.detail


@needs_root
def test_a_state_dir_owned_by_someone_else_fails(tmp_path: Path) -> None:
    config = slurm_site(tmp_path)
    os.chown(config.state_dir, NOBODY, NOBODY)
    state = by_name(run_checks(config, healthy_cluster().host()))["state_dir"]
    assert state.status == "FAIL"
    assert state.fix is not None
    assert state.fix.startswith("chown -R ")


def test_the_gateway_state_dir_is_checked_too(tmp_path: Path) -> None:
    gateway = tmp_path / "gateway"
    gateway.mkdir(mode=0o755)
    gateway.chmod(0o755)
    for name in ("hook", "tokens"):
        (tmp_path / name).write_text("secret\n")
        (tmp_path / name).chmod(0o600)
    config = slurm_site(tmp_path, f'[gateway]\nlisten = "127.0.0.1:8443"\n'
                                  f'webhook_secret_file = "{tmp_path}/hook"\n'
                                  f'agent_tokens_file = "{tmp_path}/tokens"\nstate_dir = "{gateway}"\n')
    found = by_name(run_checks(config, healthy_cluster().host()))
    assert found["gateway.state_dir"].status == "FAIL"
    assert found["secret gateway.webhook_secret_file"].status == "ok"
    assert found["secret gateway.agent_tokens_file"].status == "ok"


def test_work_root_in_tmp_warns_with_slurm(tmp_path: Path) -> None:
    extra = 'work_root = "/tmp/hpc-runner-doctor-test/work"\n'
    slurm = parse_config_text(f'state_dir = "{tmp_path}/state"\nexecutor = "slurm"\n{extra}')
    work_root = by_name(run_checks(slurm, healthy_cluster().host()))["work_root"]
    assert work_root.status == "warn"
    assert "node-local" in work_root.detail
    local = parse_config_text(f'state_dir = "{tmp_path}/state"\nexecutor = "local"\n{extra}')
    assert by_name(run_checks(local, healthy_cluster().host()))["work_root"].status == "ok"


def test_work_root_that_is_a_file_fails(tmp_path: Path) -> None:
    (tmp_path / "work").write_text("")
    config = slurm_site(tmp_path, executor="local")
    work_root = by_name(run_checks(config, healthy_cluster().host()))["work_root"]
    assert work_root.status == "FAIL"
    assert "not a directory" in work_root.detail


# --- secrets and policy through doctor -----------------------------------------------------------


def buildkite_site(tmp_path: Path, token_mode: int) -> AgentConfig:
    token = tmp_path / "token"
    token.write_text("bk-token\n")
    token.chmod(token_mode)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(StepSigner().public_jwks())
    jwks.chmod(0o644)
    policy = tmp_path / "policy.toml"
    policy.write_text('version = 1\n[accounts.esm]\nslurm_account = "esm"\npartitions = ["batch"]\n')
    policy.chmod(0o644)
    return slurm_site(tmp_path, f'policy = "{policy}"\n[buildkite]\ntoken_file = "{token}"\n'
                                f'verification_jwks_file = "{jwks}"\n')


def test_a_world_readable_secret_fails_with_chmod_600(tmp_path: Path) -> None:
    checks = run_checks(buildkite_site(tmp_path, 0o644), healthy_cluster().host())
    secret = by_name(checks)["secret buildkite.token_file"]
    assert secret.status == "FAIL"
    assert "mode 0644" in secret.detail
    assert secret.fix == f"chmod 600 {tmp_path}/token"
    assert by_name(checks)["file buildkite.verification_jwks_file"].status == "ok"
    assert by_name(checks)["policy"].status == "ok"


def test_a_missing_secret_fails(tmp_path: Path) -> None:
    config = buildkite_site(tmp_path, 0o600)
    (tmp_path / "token").unlink()
    secret = by_name(run_checks(config, healthy_cluster().host()))["secret buildkite.token_file"]
    assert secret.status == "FAIL"
    assert "does not exist" in secret.detail


def test_a_policy_exposing_the_state_dir_fails(tmp_path: Path) -> None:
    config = buildkite_site(tmp_path, 0o600)
    assert config.policy is not None
    config.policy.write_text(binds_policy(f"{tmp_path}:/data:ro", grant="leaky"))
    policy = by_name(run_checks(config, healthy_cluster().host()))["policy"]
    assert policy.status == "FAIL"
    assert "grant 'leaky'" in policy.detail
    assert f"contains {tmp_path}/state" in policy.detail


def test_an_invalid_policy_fails_naming_file_and_line(tmp_path: Path) -> None:
    config = buildkite_site(tmp_path, 0o600)
    assert config.policy is not None
    config.policy.write_text("version = 1\n[accounts.esm]\nslurm_account = \"esm\"\npartitionz = []\n")
    policy = by_name(run_checks(config, healthy_cluster().host()))["policy"]
    assert policy.status == "FAIL"
    assert "policy.toml:" in policy.detail
    assert policy.fix is not None
    assert "hpc-runner policy check" in policy.fix


def test_a_group_writable_policy_fails(tmp_path: Path) -> None:
    config = buildkite_site(tmp_path, 0o600)
    assert config.policy is not None
    config.policy.chmod(0o664)
    policy = by_name(run_checks(config, healthy_cluster().host()))["policy"]
    assert policy.status == "FAIL"
    assert policy.fix == f"chmod go-w {config.policy}"


def test_the_embedded_default_policy_is_named() -> None:
    config = parse_config_text("")
    assert by_name(run_checks(config, healthy_cluster().host()))["policy"].detail.startswith(
        "embedded default policy")


# --- the command ---------------------------------------------------------------------------------


def test_an_invalid_config_is_the_only_failure_reported(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('executor = "pbs"\n')
    checks = doctor(str(path), healthy_cluster().host())
    assert [(c.name, c.status) for c in checks] == [("config", "FAIL")]
    assert "config.toml:1: executor:" in checks[0].detail
    assert exit_status(checks) == 1


def test_json_output_lists_every_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    (tmp_path / "state").mkdir(mode=0o700)
    path.write_text(f'state_dir = "{tmp_path}/state"\nexecutor = "slurm"\n')
    status = run_doctor(argparse.Namespace(config=str(path), json=True), healthy_cluster().host())
    listed = json.loads(capsys.readouterr().out)
    assert [item["name"] for item in listed] == ["config", "apptainer", "slurm", "slurmctld", "munge", "mpi",
                                                 "policy", "state_dir", "work_root", "state_dir_space",
                                                 "work_root_space"]
    assert set(listed[0]) == {"name", "status", "detail", "fix"}
    assert status == (1 if any(item["status"] == "FAIL" for item in listed) else 0)


def test_a_real_run_prints_a_line_for_each_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    status = run_doctor(argparse.Namespace(config=None, json=False))
    lines = capsys.readouterr().out.splitlines()
    checks = [line for line in lines if line.split("  ")[0].strip() in ("ok", "warn", "FAIL")]
    names = [line.split(":")[0].split()[-1] for line in checks]
    assert names == ["config", "apptainer", "slurm", "slurmctld", "munge", "mpi", "policy", "state_dir",
                     "work_root", "state_dir_space", "work_root_space"]
    assert lines[-1].startswith("doctor: ")
    for index, line in enumerate(lines[:-1]):
        if line.startswith("FAIL"):
            assert lines[index + 1].startswith("      fix: ")
    assert status == (1 if any(line.startswith("FAIL") for line in lines) else 0)


# --- secret files --------------------------------------------------------------------------------


def secret(tmp_path: Path, content: str, mode: int) -> Path:
    path = tmp_path / "secret"
    path.write_text(content)
    path.chmod(mode)
    return path


def test_a_0600_secret_is_read_without_its_trailing_newline(tmp_path: Path) -> None:
    assert read_secret_file(secret(tmp_path, "s3cret\n", 0o600), what="token") == "s3cret"
    assert read_secret_file(secret(tmp_path, "s3cret\r\n", 0o600), what="token") == "s3cret"
    # Only one newline is an editor's; the rest is the file's content.
    assert read_secret_file(secret(tmp_path, "line1\nline2\n\n", 0o600), what="key") == "line1\nline2\n"
    assert read_secret_file(secret(tmp_path, "s3cret", 0o400), what="token") == "s3cret"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_a_secret_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = secret(tmp_path, "s3cret\n", mode)
    with pytest.raises(SecretFileError) as caught:
        read_secret_file(path, what="Buildkite agent token")
    message = str(caught.value)
    assert f"Buildkite agent token {path}" in message
    assert f"mode {mode:04o}" in message
    assert f"chmod 600 {path}" in message
    assert "s3cret" not in message


def test_a_symlink_to_a_secret_is_refused(tmp_path: Path) -> None:
    target = secret(tmp_path, "s3cret\n", 0o600)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(SecretFileError, match="is a symbolic link"):
        read_secret_file(link, what="token")


@pytest.mark.parametrize("content", ["", "\n", "  \n"])
def test_an_empty_secret_is_refused(tmp_path: Path, content: str) -> None:
    with pytest.raises(SecretFileError, match="is empty"):
        read_secret_file(secret(tmp_path, content, 0o600), what="token")


def test_a_directory_or_fifo_is_not_a_secret(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(SecretFileError, match="not a regular file"):
        read_secret_file(directory, what="token")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    # Must not block waiting for a writer.
    with pytest.raises(SecretFileError, match="not a regular file"):
        read_secret_file(fifo, what="token")


def test_a_missing_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError, match="does not exist"):
        read_secret_file(tmp_path / "nope", what="token")


def test_binary_secret_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"\xff\xfe")
    path.chmod(0o600)
    with pytest.raises(SecretFileError, match="not UTF-8"):
        read_secret_file(path, what="token")


@needs_root
def test_a_secret_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    path = secret(tmp_path, "s3cret\n", 0o600)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(SecretFileError) as caught:
        read_secret_file(path, what="token")
    assert "is owned by nobody" in str(caught.value)
    assert f"chown root {path}" in caught.value.fix


def test_trusted_files_may_be_read_by_all_but_written_only_by_the_owner(tmp_path: Path) -> None:
    path = secret(tmp_path, "{}", 0o644)
    check_not_writable_by_others(path, "JWKS")
    path.chmod(0o664)
    with pytest.raises(SecretFileError, match="writable by group or others") as caught:
        check_not_writable_by_others(path, "JWKS")
    assert caught.value.fix == f"chmod go-w {path}"


def test_a_trusted_file_in_a_group_writable_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o775)
    path = directory / "policy.toml"
    path.write_text("version = 1\n")
    path.chmod(0o644)
    with pytest.raises(SecretFileError, match="the directory holding the policy"):
        check_not_writable_by_others(path, "policy")


@needs_root
def test_a_trusted_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = secret(tmp_path, "{}", 0o644)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(SecretFileError, match="owned by nobody"):
        check_not_writable_by_others(path, "JWKS")
