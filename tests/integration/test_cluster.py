"""The local test cluster is real: Slurm runs the service account's jobs, Apptainer runs the test image."""

from __future__ import annotations

import hashlib
import subprocess
from datetime import datetime
from pathlib import Path

from conftest import (
    SERVICE_USER,
    TEST_IMAGE,
    USABLE_NODE_STATES,
    Cluster,
    apptainer_exec_argv,
    as_service_user,
    wait_for_slurm_job,
)


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
