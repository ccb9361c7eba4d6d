"""`hpc-runner run JOB.toml`: one job through the lifecycle the agent uses (runner.lifecycle), in
the foreground: the job's output on stdout, hpc-runner's own lines on stderr, its end as the exit
status."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from runner import exitcodes
from runner.agent import slurm_executor
from runner.commands.policy import local_identity
from runner.config import AgentConfig, default_config, load_config
from runner.errors import InputError
from runner.identity import Identity, load_identity
from runner.job import Ended, JobState
from runner.lifecycle.admission import Admission, Admissions
from runner.lifecycle.driver import JobDriver
from runner.lifecycle.notes import to_stderr
from runner.lifecycle.prepare import Site
from runner.site_policy import load_site_policy
from runner.spec import JobSpec, load_job
from runner.store import Store


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run", help="run one job in the foreground (exit: the job's status; 126 denied; 125 infrastructure)")
    parser.add_argument("job", metavar="JOB.toml")
    parser.add_argument("--policy", metavar="P",
                        help="policy file (default: the config's, else the embedded one)")
    parser.add_argument("--identity", metavar="I.json", help="decide as this identity (default: you)")
    parser.add_argument("--executor", choices=("local", "slurm"), help="default: the config's executor")
    parser.add_argument("--config", metavar="C")
    parser.add_argument("--workdir", metavar="DIR",
                        help="the job's workspace (default: the current directory)")
    parser.set_defaults(handler=run)


def _load(args: argparse.Namespace) -> tuple[AgentConfig, JobSpec, Identity]:
    config = load_config(args.config) if args.config else default_config()
    spec = load_job(args.job)
    identity = load_identity(args.identity) if args.identity else local_identity()
    return config, spec, identity


def run(args: argparse.Namespace) -> int:
    try:
        config, spec, identity = _load(args)
    except InputError as exc:
        print(f"hpc-runner: {exc}", file=sys.stderr)
        return exitcodes.INFRASTRUCTURE
    executor = args.executor or config.executor
    try:
        policy = load_site_policy(config, explicit=args.policy)
    except InputError as exc:
        print(f"hpc-runner: invalid policy: {exc}", file=sys.stderr)
        return exitcodes.INFRASTRUCTURE
    workspace = Path(args.workdir) if args.workdir else Path.cwd()
    with Store.open(config.state_dir) as store:
        job_id, ended = asyncio.run(_admit_and_drive(Site(config, policy), store, identity, spec, workspace,
                                                     executor=executor))
    if ended.state == JobState.denied:
        return exitcodes.DENIED
    if ended.state != JobState.succeeded:
        print(f"hpc-runner: job {job_id} {ended.state}: {ended.detail}", file=sys.stderr)
    return exitcodes.for_outcome(str(ended.state), ended.exit_status)


async def _admit_and_drive(site: Site, store: Store, identity: Identity, spec: JobSpec, workspace: Path, *,
                           executor: str) -> tuple[str, Ended]:
    """Admit the job as the agent would, with the caller's directory as its workspace, and drive
    it; Ctrl-C or SIGTERM cancels it."""
    admission = Admission("local", None, identity, spec, workspace=workspace)
    admitted = await Admissions(site, store, to_stderr).admit(admission)
    if not admitted.decision.allowed:
        return admitted.job_id, Ended(JobState.denied, None, None)
    slurm = slurm_executor(site.config) if executor == "slurm" else None
    driver = JobDriver(site, store, grace_seconds=site.config.sandbox.grace_period, notes=to_stderr,
                       slurm=slurm, actor=identity.actor_principal)
    try:
        return admitted.job_id, await driver.drive(admitted.job_id, cancel=cancel_on_signals(),
                                                   sink=write_stdout, offset=0)
    finally:
        if slurm is not None:
            await slurm.close()


def cancel_on_signals() -> asyncio.Event:
    """An event set by Ctrl-C or SIGTERM (from then on, neither ends the process)."""
    cancel = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, cancel.set)
    return cancel


async def write_stdout(_offset: int, data: bytes) -> None:
    """The job's output, as it wrote it."""
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
