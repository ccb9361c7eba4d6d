"""`hpc-runner run` as the service account: the real Apptainer, the test image and the host Open MPI.

Each test writes its own config and policy (``runner_site``) and runs one job in the foreground,
the way a new user would try the tool before setting up an agent.
"""

from __future__ import annotations

import os
import pwd
import re
import time

import pytest
from conftest import (
    SERVICE_USER,
    Cluster,
    RunnerSite,
    config_toml,
    job_toml,
    policy_toml,
    write_public_file,
)

# A job that would leave this file in its workspace: proof that it ran, or that it did not.
RAN_MARKER = "ran.txt"
TOUCH_MARKER = f"touch /work/{RAN_MARKER}\necho the job ran\n"

# `hpc-runner run` starts Python, verifies (hashes) the image and writes the job's files before
# the walltime clock starts, and reports after the job's processes are gone. On these machines
# that takes well under a second; this allows for a loaded CI machine.
STARTUP_TOLERANCE_S = 2.0


def assert_nothing_ran(site: RunnerSite) -> None:
    assert not (site.workspace / RAN_MARKER).exists(), "the job ran although it should not have started"


def test_exit_status_of_the_job_is_the_exit_status_of_run(runner_site: RunnerSite) -> None:
    job = runner_site.write_job("exit-3", job_toml("exit-3", script="echo about to fail\nexit 3\n"))

    result = runner_site.run(job)

    assert result.returncode == 3, result.stderr
    assert result.stdout == "about to fail\n"
    assert "failed: exit status 3" in result.stderr


def test_walltime_overrun_ends_timed_out_within_the_grace_period(runner_site: RunnerSite) -> None:
    walltime_s, grace_s = 2.0, 1.0  # the job's time and runner_site's grace_period
    # Ignoring SIGTERM (inherited by sleep) forces the runner to wait out the grace period and
    # then SIGKILL: the slowest way a job can end.
    script = "trap '' TERM\necho started\nsleep 60\necho still running after the walltime\n"
    job = runner_site.write_job("too-slow", job_toml("too-slow", script=script, time="2s"))

    started = time.monotonic()
    result = runner_site.run(job, timeout=60)
    elapsed = time.monotonic() - started

    assert result.returncode == 124, result.stderr
    assert "timed_out: walltime of 2s exceeded" in result.stderr
    assert result.stdout.splitlines() == [
        "started",
        "hpc-runner: walltime of 2s exceeded; sent SIGTERM",
        "hpc-runner: walltime of 2s exceeded; sent SIGKILL",
    ]
    assert elapsed >= walltime_s, f"stopped after {elapsed:.2f} s, before its walltime of {walltime_s:g} s"
    limit = walltime_s + grace_s + 1.0 + STARTUP_TOLERANCE_S
    assert elapsed <= limit, f"took {elapsed:.2f} s; walltime + grace + 1 s + startup is {limit:g} s"


def test_digest_mismatch_names_the_image_and_both_digests_and_runs_nothing(
    runner_site: RunnerSite, cluster: Cluster
) -> None:
    pinned = "0123456789abcdef" * 4
    runner_site.write_policy(policy_toml(pinned))
    job = runner_site.write_job("pinned", job_toml("pinned", script=TOUCH_MARKER))

    result = runner_site.run(job)

    assert result.returncode == 125, result.stderr
    assert f"image 'test' ({cluster.image})" in result.stderr
    assert f"sha256 mismatch: expected {pinned}, found {cluster.image_sha256}" in result.stderr
    assert result.stdout == ""
    assert_nothing_ran(runner_site)


def test_missing_image_names_its_path_and_runs_nothing(runner_site: RunnerSite, cluster: Cluster) -> None:
    missing = runner_site.root / "images" / "gone.sif"
    runner_site.write_policy(policy_toml(cluster.image_sha256, image_path=missing))
    job = runner_site.write_job("no-image", job_toml("no-image", script=TOUCH_MARKER))

    result = runner_site.run(job)

    assert result.returncode == 125, result.stderr
    assert f"image 'test' ({missing}): no such file or directory" in result.stderr
    assert result.stdout == ""
    assert_nothing_ran(runner_site)


def test_bind_the_grant_does_not_cover_is_denied_naming_the_bind_and_runs_nothing(
    runner_site: RunnerSite,
) -> None:
    job = runner_site.write_job(
        "wants-etc", job_toml("wants-etc", script=TOUCH_MARKER, binds=["/etc:/host-etc:ro"]))

    result = runner_site.run(job)

    assert result.returncode == 126, result.stderr
    assert "denied by policy" in result.stderr
    assert "grant 'ci-jobs': bind /etc:/host-etc:ro is not granted" in result.stderr
    assert result.stdout == ""
    assert_nothing_ran(runner_site)


@pytest.mark.parametrize("ranks", [2, 4])
def test_mpi_ranks_of_the_host_open_mpi_form_one_world(runner_site: RunnerSite, ranks: int) -> None:
    # The image has no MPI library: the host's Open MPI is bound in, ranks start under mpirun.
    job = runner_site.write_job(
        f"mpi-{ranks}", job_toml(f"mpi-{ranks}", command=["/usr/local/bin/mpi-hello"], tasks=ranks, mpi=True))

    result = runner_site.run(job)

    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = re.findall(r"^rank (\d+) of (\d+)$", result.stdout, re.M)
    seen = [(int(rank), int(size)) for rank, size in lines]
    singletons = [pair for pair in seen if pair[1] == 1]
    assert not singletons, f"ranks started as singletons, not as one MPI world:\n{result.stdout}"
    assert sorted(seen) == [(rank, ranks) for rank in range(ranks)], result.stdout
    assert f"world size {ranks}\n" in result.stdout
    assert f"allreduce sum {ranks * (ranks + 1) // 2}\n" in result.stdout


# Each rank prints the user and mount namespaces it runs in; rank 0 then ends at once, often
# before the other rank's Apptainer has joined its namespaces.
SHORT_RANK_SCRIPT = (
    'echo "rank $OMPI_COMM_WORLD_RANK in $(readlink /proc/self/ns/user) $(readlink /proc/self/ns/mnt)"\n'
    '[ "$OMPI_COMM_WORLD_RANK" = 0 ] && exit 0\n'
    'echo "rank $OMPI_COMM_WORLD_RANK ran on"\n'
)
SHORT_RANK_LINE = re.compile(r"^rank (\d) in (user:\[\d+\] mnt:\[\d+\])$", re.M)


def test_a_rank_that_ends_at_once_does_not_fail_the_ranks_still_starting(runner_site: RunnerSite) -> None:
    # Ranks on one node share namespaces (--sharens): the later ones join those of the first
    # through /proc/PID of its container process. Such jobs failed with "could not open proc
    # directory" when that process had already ended (5 of these 10 before the fix).
    job = runner_site.write_job(
        "short-rank", job_toml("short-rank", command=["/bin/sh", "-c", SHORT_RANK_SCRIPT], tasks=2, mpi=True))

    failures = []
    for attempt in range(10):
        result = runner_site.run(job)
        namespaces = dict(SHORT_RANK_LINE.findall(result.stdout))
        if (result.returncode != 0 or sorted(namespaces) != ["0", "1"] or len(set(namespaces.values())) != 1
                or "rank 1 ran on\n" not in result.stdout):
            failures.append(f"job {attempt}: exit {result.returncode}\nstdout:\n{result.stdout}\n"
                            f"stderr:\n{result.stderr}")

    assert not failures, f"{len(failures)} of 10 jobs failed:\n" + "\n".join(failures)


def test_workspace_is_the_writable_working_directory_and_its_files_belong_to_the_service_account(
    runner_site: RunnerSite,
) -> None:
    write_public_file(runner_site.workspace / "input.txt", "from the host\n")
    script = (
        "pwd\n"
        'echo "$HPC_RUNNER_WORKSPACE"\n'
        "cat input.txt\n"
        "mkdir results\n"
        "echo written by the job > results/output.txt\n"
    )
    job = runner_site.write_job("workspace", job_toml("workspace", script=script))

    result = runner_site.run(job)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["/work", "/work", "from the host"]
    output = runner_site.workspace / "results" / "output.txt"
    assert output.read_text() == "written by the job\n"
    service_uid = pwd.getpwnam(SERVICE_USER).pw_uid
    assert output.stat().st_uid == service_uid
    assert output.parent.stat().st_uid == service_uid


def test_invalid_job_file_is_refused_naming_file_line_and_field(runner_site: RunnerSite) -> None:
    text = '[job]\nname = "no-nodes"\nimage = "test"\ncommand = ["true"]\n\n[job.resources]\nnodes = 0\n'
    job = runner_site.write_job("no-nodes", text)

    result = runner_site.run(job)

    assert result.returncode == 125
    assert f"{job}:7: job.resources.nodes: must be at least 1, got 0" in result.stderr
    assert result.stdout == ""


def test_missing_apptainer_is_an_infrastructure_error_naming_it(runner_site: RunnerSite) -> None:
    apptainer = runner_site.root / "no-such-dir" / "apptainer"
    config = runner_site.root / "no-apptainer.toml"
    write_public_file(config, config_toml(runner_site.root, policy=runner_site.policy,
                                          apptainer=str(apptainer)))
    job = runner_site.write_job("no-apptainer", job_toml("no-apptainer", script=TOUCH_MARKER))

    result = runner_site.run(job, "--config", os.fspath(config))

    assert result.returncode == 125, result.stderr
    assert f"cannot start {apptainer}" in result.stderr
    assert_nothing_ran(runner_site)
