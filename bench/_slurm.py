"""What the Slurm benchmarks share: a site, prepared jobs and Slurm's commands as the service account.

The benchmarks run as root (like the others) and submit as the service account, as the agent
does in production: every Slurm command goes through `runuser -u hpcrunner --` with the
account's clean environment. Jobs are prepared by the product's own pipeline; their files are
then handed to the service account, as the agent's own files would belong to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from bench._common import (
    IMAGE,
    IMAGE_NAME,
    SERVICE_ENV,
    SERVICE_USER,
    WORK_PARENT,
    BenchError,
    give_to_service,
)
from runner.config import parse_config_text
from runner.executors.slurm import SlurmCli, SlurmExecutor, SubprocessRunner
from runner.identity import identity_from_json
from runner.job import new_job_id
from runner.job.prepared import PreparedJob
from runner.lifecycle.prepare import Site, prepare_job
from runner.policy import decide, parse_policy_text
from runner.spec import parse_job_text

RUNUSER = shutil.which("runuser", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/runuser"
# An account of the dev cluster's Slurm accounting that the service account may charge.
SLURM_ACCOUNT = "hpcr-test"


def service_cli(timeout: float = 30.0) -> SlurmCli:
    env = {**SERVICE_ENV, "USER": SERVICE_USER, "LOGNAME": SERVICE_USER}
    return SlurmCli(SubprocessRunner(prefix=[RUNUSER, "-u", SERVICE_USER, "--"], env=env), timeout=timeout)


def check_slurm() -> None:
    result = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60, check=False)
    if "is UP" not in result.stdout:
        raise BenchError(f"slurmctld does not answer ({result.stdout.strip() or result.stderr.strip()}); "
                         "run `sudo bash deploy/dev/setup.sh` first")


@dataclass
class SlurmBenchSite:
    root: Path
    site: Site
    workspace: Path

    def prepare(self, job_text: str) -> PreparedJob:
        """Decide and prepare a job as the agent's pipeline does (timed by callers), as root."""
        spec = parse_job_text(job_text, "<bench job>")
        identity = identity_from_json({"source": "local", "user": SERVICE_USER})
        decision = decide(self.site.policy, identity, spec)
        if not decision.allowed:
            raise BenchError(f"the bench policy denies {spec.name}: {'; '.join(decision.reasons)}")
        return prepare_job(self.site, job_id=new_job_id(), spec=spec, decision=decision,
                           workspace=self.workspace)

    def hand_over(self, prepared: PreparedJob) -> None:
        """Give the job's files to the service account (the agent would own them already)."""
        prepared.log_path.touch()
        account = pwd.getpwnam(SERVICE_USER)
        for directory, _, files in os.walk(self.site.config.work_root):
            os.chown(directory, account.pw_uid, account.pw_gid)
            for name in files:
                os.chown(os.path.join(directory, name), account.pw_uid, account.pw_gid)


def slurm_policy_text(principal: str) -> str:
    """A policy for the dev cluster: account `bench` (Slurm's SLURM_ACCOUNT, partition debug), the test
    image pinned by its digest, and one grant of both (and MPI) to `principal`."""
    sha = IMAGE.with_name(IMAGE.name + ".sha256").read_text().strip()
    return f"""version = 1

[accounts.bench]
slurm_account = "{SLURM_ACCOUNT}"
partitions = ["debug"]
max_time = "10m"

[images.{IMAGE_NAME}]
path = {json.dumps(str(IMAGE))}
sha256 = {json.dumps(sha)}

[[grants]]
name = "bench"
principals = ["{principal}"]
account = "bench"
images = ["{IMAGE_NAME}"]
mpi = true
"""


@contextlib.contextmanager
def slurm_site(prefix: str) -> Iterator[SlurmBenchSite]:
    """A config, policy and workspace under a fresh directory of the service account."""
    WORK_PARENT.mkdir(mode=0o755, parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=WORK_PARENT))
    try:
        give_to_service(root, 0o755)
        policy = parse_policy_text(slurm_policy_text(f"local:user:{SERVICE_USER}"), "<bench policy>")
        config = parse_config_text(f"""state_dir = {json.dumps(str(root / "state"))}
work_root = {json.dumps(str(root / "work"))}
executor = "slurm"
max_jobs = 200
""")
        site = Site(config, policy)
        # Root plans, the service account runs: no root-only Apptainer flags.
        site.sandbox = replace(site.sandbox, userns=False)
        workspace = root / "workspace"
        workspace.mkdir()
        give_to_service(workspace, 0o755)
        yield SlurmBenchSite(root, site, workspace)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def executor(poll_interval: float) -> SlurmExecutor:
    return SlurmExecutor(service_cli(), user=SERVICE_USER, poll_interval=poll_interval)


def cancel_all(slurm_ids: list[str]) -> None:
    """scancel in batches (best effort: the benchmark's result does not depend on it)."""
    for start in range(0, len(slurm_ids), 200):
        subprocess.run([RUNUSER, "-u", SERVICE_USER, "--", "scancel", *slurm_ids[start:start + 200]],
                       capture_output=True, timeout=120, check=False)
