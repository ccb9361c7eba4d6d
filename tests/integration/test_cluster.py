"""The local test cluster is real: Slurm runs the service account's jobs, Apptainer runs the test image."""

from __future__ import annotations

import hashlib
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from conftest import (
    SERVICE_USER,
    TEST_IMAGE,
    USABLE_NODE_STATES,
    Cluster,
    apptainer_exec_argv,
    as_service_user,
    as_user,
    wait_for,
    wait_for_slurm_job,
)

# What deploy/dev/setup.sh puts into Slurm's accounting database.
CLUSTER_NAME = "hpc-runner-dev"
DEFAULT_ACCOUNT = "hpcr-test"
ASSOCIATIONS = {
    SERVICE_USER: {"hpcr-test", "esm", "ocean", "local", "demo"},
    "root": {"hpcr-test", "esm", "ocean", "local", "demo"},
    "hpcr-alice": {"hpcr-test", "esm"},
    "hpcr-bob": {"hpcr-test", "ocean"},
}
INVALID_ACCOUNT = "Invalid account or account/partition combination specified"


def _root_output(argv: list[str]) -> str:
    result = subprocess.run(argv, text=True, capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, f"{argv} exited {result.returncode}: {result.stderr}"
    return result.stdout


def test_node_accepts_jobs(cluster: Cluster) -> None:
    states = dict(line.split() for line in _root_output(["sinfo", "-h", "-N", "-o", "%N %T"]).splitlines())
    assert states.get(cluster.node) in USABLE_NODE_STATES, states


def test_partitions(cluster: Cluster) -> None:
    limits = dict(line.split() for line in _root_output(["sinfo", "-h", "-o", "%P %l"]).splitlines())
    assert limits == {"debug*": "4:00:00", "batch": "1-00:00:00"}
    assert cluster.default_partition == "debug"


def test_batch_job_runs_as_service_user(cluster: Cluster, service_tmp: Path) -> None:
    submitted = as_service_user(
        [
            "sbatch",
            "--parsable",
            "--job-name=hpc-runner-test-hello",
            "--time=1",
            f"--chdir={service_tmp}",
            f"--output={service_tmp}/job-%j.out",
            "--wrap",
            "echo hello-from-slurm; id -un",
        ],
        cwd=service_tmp,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    assert job_id.isdigit(), submitted.stdout

    job = wait_for_slurm_job(job_id, timeout=60)
    assert job["JobState"] == "COMPLETED", job
    assert job["ExitCode"] == "0:0", job
    waited = datetime.fromisoformat(job["StartTime"]) - datetime.fromisoformat(job["SubmitTime"])
    assert waited.total_seconds() <= 15, f"job {job_id} waited {waited} to start"

    lines = (service_tmp / f"job-{job_id}.out").read_text().splitlines()
    assert lines == ["hello-from-slurm", SERVICE_USER]


def test_image_runs_as_service_user(cluster: Cluster, service_tmp: Path) -> None:
    result = as_service_user(apptainer_exec_argv("cat", "/etc/os-release"), cwd=service_tmp)
    assert result.returncode == 0, result.stderr
    assert "VERSION_CODENAME=bookworm" in result.stdout


def test_image_has_no_mpi_library(cluster: Cluster, service_tmp: Path) -> None:
    # The host's Open MPI is bind-mounted at run time; a copy in the image would shadow it.
    result = as_service_user(
        apptainer_exec_argv(
            "find", "/usr", "/opt", "(", "-name", "libmpi*", "-o", "-name", "libopen-pal*", ")", "-print"
        ),
        cwd=service_tmp,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_image_mpi_programs_link_the_host_mpi(cluster: Cluster, service_tmp: Path) -> None:
    for program in ("/usr/local/bin/mpi-hello", "/usr/local/bin/mpi-latency"):
        result = as_service_user(apptainer_exec_argv("ldd", program), cwd=service_tmp)
        missing = [line for line in result.stdout.splitlines() if "not found" in line]
        assert any("libmpi.so" in line for line in missing), (program, result.stdout, result.stderr)


def test_image_checksum_file(cluster: Cluster) -> None:
    digest = hashlib.sha256()
    with TEST_IMAGE.open("rb") as image:
        for block in iter(lambda: image.read(1 << 20), b""):
            digest.update(block)
    assert cluster.image_sha256 == digest.hexdigest()
    assert TEST_IMAGE.stat().st_mode & 0o004, "the test image must be world-readable"


# --------------------------------------------------------------------------------------------
# Accounting: slurmdbd records jobs and Slurm enforces account associations


def _submit(service_tmp: Path, name: str, *options: str) -> subprocess.CompletedProcess[str]:
    """sbatch of a short job as the service account, with its output in ``service_tmp``."""
    return as_service_user(
        [
            "sbatch",
            "--parsable",
            f"--job-name={name}",
            "--time=1",
            f"--chdir={service_tmp}",
            f"--output={service_tmp}/job-%j.out",
            *options,
            "--wrap",
            "echo accounted",
        ],
        cwd=service_tmp,
    )


def _sacctmgr_rows(*query: str) -> list[list[str]]:
    """``sacctmgr -n -P show QUERY...`` as rows of fields."""
    output = _root_output(["sacctmgr", "-n", "-P", "show", *query])
    return [line.split("|") for line in output.splitlines() if line]


def test_accounting_is_enforced(cluster: Cluster) -> None:
    lines = _root_output(["scontrol", "show", "config"]).splitlines()
    config = {key.strip(): value.strip() for key, _, value in (line.partition("=") for line in lines)}
    assert config["ClusterName"] == CLUSTER_NAME
    assert config["AccountingStorageType"] == "accounting_storage/slurmdbd"
    assert set(config["AccountingStorageEnforce"].split(",")) >= {"associations", "limits"}


def test_invalid_account_is_rejected_at_submission(cluster: Cluster, service_tmp: Path) -> None:
    submitted = _submit(service_tmp, "hpc-runner-test-bogus-account", "--account=bogus")
    assert submitted.returncode != 0, submitted.stdout
    assert INVALID_ACCOUNT in submitted.stderr, submitted.stderr
    assert submitted.stdout.strip() == "", "no job id may be printed for a rejected job"


@pytest.mark.parametrize(("option", "account"), [("--account=esm", "esm"), (None, DEFAULT_ACCOUNT)])
def test_job_is_charged_to_its_account_and_recorded_by_sacct(
    cluster: Cluster, service_tmp: Path, option: str | None, account: str
) -> None:
    submitted = _submit(service_tmp, f"hpc-runner-test-account-{account}", *([option] if option else []))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    assert job_id.isdigit(), submitted.stdout

    job = wait_for_slurm_job(job_id, timeout=60)
    assert job["JobState"] == "COMPLETED", job
    assert job["Account"] == account, job
    assert (service_tmp / f"job-{job_id}.out").read_text() == "accounted\n"

    # slurmctld sends the job's end to slurmdbd asynchronously; sacct, run by the job's owner,
    # shows it shortly after.
    def recorded() -> str | None:
        result = as_service_user(["sacct", "-j", job_id, "-n", "-X", "-P", "-o", "State,Account,User"])
        line = result.stdout.strip()
        return line if result.returncode == 0 and line.startswith("COMPLETED|") else None

    assert wait_for(recorded, 30, interval=0.5, what=f"sacct to show job {job_id} COMPLETED") == (
        f"COMPLETED|{account}|{SERVICE_USER}"
    )


def test_associations_and_default_accounts(cluster: Cluster) -> None:
    associated: dict[str, set[str]] = {}
    for account, user in _sacctmgr_rows("association", f"cluster={CLUSTER_NAME}", "format=Account,User"):
        if user:
            associated.setdefault(user, set()).add(account)
    for user, accounts in ASSOCIATIONS.items():
        assert associated.get(user, set()) >= accounts, (user, associated.get(user))
    assert "esm" in associated[SERVICE_USER]

    defaults = dict(_sacctmgr_rows("user", "format=User,DefaultAccount"))
    for user in ASSOCIATIONS:
        assert defaults.get(user) == DEFAULT_ACCOUNT, (user, defaults)


@pytest.mark.parametrize(
    ("user", "account", "allowed"),
    [
        ("hpcr-alice", "esm", True),
        ("hpcr-alice", "ocean", False),
        ("hpcr-bob", "ocean", True),
        ("hpcr-bob", "esm", False),
        ("hpcr-bob", None, True),
        ("nobody", None, False),
    ],
)
def test_users_may_only_charge_their_accounts(
    cluster: Cluster, queue_users: dict[str, str], user: str, account: str | None, allowed: bool
) -> None:
    # --test-only: Slurm checks the request, including the association, and runs nothing.
    argv = ["sbatch", "--test-only", "--time=1", "--wrap", "true"]
    if account:
        argv.insert(1, f"--account={account}")
    result = as_user(user, argv, cwd="/", timeout=30)
    if allowed:
        assert result.returncode == 0, result.stderr
        assert "to start at" in result.stderr, result.stderr
    else:
        assert result.returncode != 0, result.stderr
        assert INVALID_ACCOUNT in result.stderr, result.stderr
