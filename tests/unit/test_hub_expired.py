"""An expired job at the hub: a hub that knows the state shows it with why; a hub older than its
agents, which refuses the state it does not know, still closes the job, as cancelled, its
reasons saying it expired. A real hub on loopback, the agent's Slurm executor on scripted
Slurm commands."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from runner.executors.slurm import SlurmCli, SlurmExecutor
from runner.executors.slurm.cli import CommandResult
from runner.gateway import agent_jobs_api, jobs_protocol
from runner.spec import parse_job_text

from . import test_hub_publisher
from .test_hub_publisher import Hub, Node, ScriptedSlurm, ended_at_hub

hub, node = test_hub_publisher.hub, test_hub_publisher.node  # a real hub, and an agent publishing to it

QUEUE_TIME_JOB = parse_job_text('[job]\nname = "waits"\nimage = "test"\ncommand = ["true"]\n'
                                '[job.resources]\ntime = "10m"\nqueue_time = "1s"\n')


class BusySlurm(ScriptedSlurm):
    """Every job pends for Resources; `scancel --state=PENDING` takes a pending one out, as Slurm does."""

    async def __call__(self, argv: Sequence[str], *, timeout: float,
                       stdin: bytes | None = None) -> CommandResult:
        result = await super().__call__(argv, timeout=timeout, stdin=stdin)
        if argv[0] == "sbatch":
            (slurm_id,) = result.stdout.split()
            self.jobs[slurm_id] = ("PENDING", "Resources", "")
        elif argv[0] == "scancel" and "--state=PENDING" in argv:
            slurm_id = argv[-1]
            if self.jobs[slurm_id][0] == "PENDING":
                self.jobs[slurm_id] = ("CANCELLED", "None", "")
        return result


class OldHubProtocol:
    """The hub's side of the protocol as a hub of the release before `expired` has it: a state it
    does not know is refused (400), naming those it knows. The agent keeps the current one."""

    def __getattr__(self, name: str) -> Any:
        return getattr(jobs_protocol, name)

    @staticmethod
    def parse_state_update(body: object) -> jobs_protocol.StateUpdate:
        if isinstance(body, dict) and body.get("state") == "expired":
            known = ", ".join(s for s in jobs_protocol.STATES if s != "expired")
            raise ValueError(f"state must be one of {known}")
        return jobs_protocol.parse_state_update(body)


async def _expired_job(node: Node) -> str:
    node.slurm = SlurmExecutor(SlurmCli(BusySlurm()), poll_interval=0.02)
    node.start()
    record = await node.submit(spec=QUEUE_TIME_JOB)
    return record.id


async def test_a_hub_that_knows_expired_shows_it_with_how_long_and_why(hub: Hub, node: Node) -> None:
    job_id = await _expired_job(node)

    held, log = await ended_at_hub(hub, job_id)

    assert held.state == "expired"
    (reason,) = held.reasons
    assert reason.startswith("waited ") and "past its queue_time of 1s (Slurm's reason: Resources)" in reason
    assert f"hpc-runner: expired: {reason}".encode() in log


async def test_a_hub_older_than_its_agent_gets_an_expired_job_as_cancelled_saying_it_expired(
        hub: Hub, node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_jobs_api, "protocol", OldHubProtocol())
    job_id = await _expired_job(node)

    held, _ = await ended_at_hub(hub, job_id)

    assert held.state == "cancelled"
    assert any("past its queue_time of 1s" in reason for reason in held.reasons), held.reasons
    assert node.agent is not None and str((node.agent.job(job_id) or held).state) == "expired"

