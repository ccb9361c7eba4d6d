"""`hpc-runner run JOB.toml`: one job through the lifecycle the agent uses (runner.lifecycle), in
the foreground: the job's output on stdout, hpc-runner's own lines on stderr, its end as the exit
status."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from runner import exitcodes
from runner.agent import slurm_executor
from runner.commands.policy import local_identity
from runner.config import AgentConfig, default_config, load_config
from runner.errors import InputError
from runner.identity import Identity, load_identity
from runner.job import ACTIVE_STATES, Ended, JobState
from runner.lifecycle.admission import Admission, Admissions, redecide
from runner.lifecycle.driver import JobDriver
from runner.lifecycle.notes import to_stderr
from runner.lifecycle.prepare import Site
from runner.policy import Usage, waits_for_a_place
from runner.site_policy import load_site_policy
from runner.spec import JobSpec, load_job
from runner.store import Store

# How often a job over its account's max_concurrent_jobs looks again for a place: `run` has no
# agent to tell it when one of the account's jobs ends.
PLACE_LOOK_S = 2.0


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
    cancel = cancel_on_signals()
    try:
        if not await _wait_for_a_place(site, store, driver, admitted.job_id, cancel,
                                       actor=identity.actor_principal):
            return admitted.job_id, driver.ended(admitted.job_id)
        return admitted.job_id, await driver.drive(admitted.job_id, cancel=cancel, sink=write_stdout,
                                                   offset=0)
    finally:
        if slurm is not None:
            await slurm.close()


async def _wait_for_a_place(site: Site, store: Store, driver: JobDriver, job_id: str,
                            cancel: asyncio.Event, *, actor: str) -> bool:
    """Over its account's max_concurrent_jobs the job waits, as in the agent's queue, until one of
    the account's jobs ends (saying why on stderr); False when it was cancelled meanwhile."""
    said: str | None = None
    while (why := _why_wait(site, store, job_id)) is not None:
        if why != said:
            to_stderr(Path(), f"hpc-runner: waiting: {why} (max_concurrent_jobs); it starts when one of "
                              "them ends\n")
            said = why
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(cancel.wait(), PLACE_LOOK_S)
        if cancel.is_set():
            driver.cancel_queued(job_id, actor=actor, detail="cancelled before it started",
                                 note="hpc-runner: cancelled before it started\n")
            return False
    return True


def _why_wait(site: Site, store: Store, job_id: str) -> str | None:
    """Why the job cannot start yet under its account's max_concurrent_jobs, or None: the
    account's jobs in Slurm or running, and those queued before it, take the places."""
    record = store.get_job(job_id)
    assert record is not None
    _, decision = redecide(site.policy, record)
    account = site.policy.accounts.get(decision.account or "")
    if not decision.allowed or account is None or account.max_concurrent_jobs is None:
        return None
    taken = store.count_by_account(ACTIVE_STATES).get(account.name, 0) + sum(
        1 for other in store.list_jobs(states=[JobState.queued])
        if other.id != job_id and (other.decision or {}).get("account") == account.name
        and (other.created_at, other.id) < (record.created_at, record.id))
    return waits_for_a_place(account, Usage(running_by_account={account.name: taken}))


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
