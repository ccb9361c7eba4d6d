"""`hpc-runner run JOB.toml`: one job through the whole pipeline, in the foreground."""

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
from runner.errors import InfrastructureError, InputError
from runner.executors.local import LocalExecutor, local_launch
from runner.executors.slurm import SlurmUnavailable, SubmissionFailed
from runner.executors.slurm.executor import append_log_line
from runner.identity import Identity, load_identity
from runner.job import JobState, Outcome, new_job_id
from runner.job.prepared import PreparedJob
from runner.logs.tail import follow
from runner.pipeline import Site, prepare_job
from runner.policy import decide
from runner.site_policy import load_site_policy
from runner.slurmflow import follow_slurm_job, pump_log
from runner.spec import JobSpec, load_job
from runner.store import Store
from sandbox.plan import SandboxRefused


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
    site = Site(config, policy)
    decision = decide(policy, identity, spec)
    with Store.open(config.state_dir) as store:
        record = store.add_job(source="local", identity=identity.to_json(), spec=spec.to_json(),
                               job_id=new_job_id())
        store.record_decision(record.id, actor=identity.actor_principal, decision=decision.to_json())
        if not decision.allowed:
            print("hpc-runner: denied by policy:", file=sys.stderr)
            for reason in decision.reasons:
                print(f"  - {reason}", file=sys.stderr)
            return exitcodes.DENIED
        workspace = Path(args.workdir) if args.workdir else Path.cwd()
        try:
            prepared = prepare_job(site, job_id=record.id, spec=spec, decision=decision, workspace=workspace)
        except SandboxRefused as exc:
            store.set_state(record.id, JobState.denied, outcome_detail=str(exc))
            print(f"hpc-runner: refused: {exc}", file=sys.stderr)
            return exitcodes.DENIED
        except InfrastructureError as exc:
            store.set_state(record.id, JobState.infra_failed, outcome_detail=str(exc))
            print(f"hpc-runner: {exc}", file=sys.stderr)
            return exitcodes.INFRASTRUCTURE
        store.set_log_path(record.id, prepared.log_path)
        store.append_audit(actor=identity.actor_principal, action="started", job_id=record.id,
                           detail={"argv": list(prepared.argv), "image": prepared.image.path,
                                   "image_sha256": prepared.image.sha256})
        try:
            if executor == "slurm":
                # pending until Slurm starts it, then running
                outcome = asyncio.run(_execute_on_slurm(prepared, store, config))
            else:
                store.set_state(record.id, JobState.running)
                outcome = asyncio.run(_execute(prepared, config.sandbox.grace_period))
        except InfrastructureError as exc:
            # Apptainer (or mpirun) could not be started: the job never ran.
            store.set_state(record.id, JobState.infra_failed, outcome_detail=str(exc))
            print(f"hpc-runner: {exc}", file=sys.stderr)
            return exitcodes.INFRASTRUCTURE
        store.set_state(record.id, JobState(outcome.state), exit_status=outcome.exit_status,
                        outcome_detail=outcome.detail)
    if outcome.state != "succeeded":
        print(f"hpc-runner: job {record.id} {outcome.state}: {outcome.detail}", file=sys.stderr)
    return exitcodes.for_outcome(outcome.state, outcome.exit_status)


def _cancel_on_signals() -> asyncio.Event:
    cancel = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, cancel.set)
    return cancel


async def _write_stdout(_offset: int, data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


async def _execute_on_slurm(prepared: PreparedJob, store: Store, config: AgentConfig) -> Outcome:
    """Submit with sbatch, stream the job's output file to stdout; Ctrl-C cancels it in Slurm.

    A job a failed node ended is submitted once more when its account allows it; the second
    attempt appends to the same output file, which is streamed on from where the first stopped.
    """
    cancel = _cancel_on_signals()
    slurm = slurm_executor(config)
    shown = 0

    async def to_stdout(offset: int, data: bytes) -> None:
        nonlocal shown
        await _write_stdout(offset, data)
        shown = offset + len(data)

    try:
        for attempt in (1, 2):
            store.set_slurm_id(prepared.job_id, None, "slurm")
            store.set_state(prepared.job_id, JobState.pending)
            try:
                job = await slurm.submit(prepared, comment=f"hpc-runner run {prepared.job_id}")
            except SubmissionFailed as exc:
                await pump_log(prepared.log_path, offset=shown, done=lambda: True, sink=to_stdout)
                return Outcome("failed", None, f"Slurm refused the job: {exc.slurm_message}")
            except SlurmUnavailable as exc:
                raise InfrastructureError(f"could not submit the job to Slurm: {exc}") from None
            assert job.slurm_id is not None
            store.set_slurm_id(prepared.job_id, job.slurm_id, "slurm")

            def running() -> None:
                store.set_state(prepared.job_id, JobState.running)

            outcome = await follow_slurm_job(slurm, job, offset=shown, sink=to_stdout, cancel=cancel,
                                             grace_seconds=config.sandbox.grace_period, on_running=running)
            if not (outcome.retryable and attempt == 1 and prepared.decision.retry_node_failure
                    and not cancel.is_set()):
                return outcome
            store.append_audit(actor="hpc-runner run", action="resubmitted", job_id=prepared.job_id,
                               detail={"reason": outcome.detail, "previous_slurm_id": job.slurm_id})
            append_log_line(prepared.log_path, f"hpc-runner: {outcome.detail}; submitting it again, "
                            f"once, as account {prepared.decision.account} allows (retry_node_failures)")
        return outcome
    finally:
        await slurm.close()


async def _execute(prepared: PreparedJob, grace_seconds: float) -> Outcome:
    """Run the job while copying its log to stdout; Ctrl-C or SIGTERM cancels it."""
    cancel = _cancel_on_signals()
    task = asyncio.create_task(LocalExecutor().run(local_launch(prepared, grace_seconds), cancel))
    out = sys.stdout.buffer
    async for _offset, chunk in follow(prepared.log_path, done=task.done):
        out.write(chunk)
        out.flush()
    return await task
