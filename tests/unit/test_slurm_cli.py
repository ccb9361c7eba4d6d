"""Slurm's commands as the CLI runs and reads them, against a scripted command runner.

The answers are what Slurm 22.05 prints (captured on the development cluster); the integration
tests check the same calls against the real daemons.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

import pytest

from runner.executors.slurm.cli import (
    CommandResult,
    SlurmCli,
    SlurmUnavailable,
    SqueueRow,
    SubmissionFailed,
    SubprocessRunner,
    parse_scontrol_record,
)

INVALID_ID = "slurm_load_jobs error: Invalid job id specified\n"
SCONTROL_LINE = (
    "JobId=28 JobName=hpcr-01jd5x7k2m9qr UserId=hpcrunner(999) GroupId=hpcrunner(995) MCS_label=N/A "
    "Priority=4294901733 Nice=0 Account=hpcr-test QOS=normal JobState=TIMEOUT Reason=TimeLimit "
    "Dependency=(null) Requeue=0 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:15 RunTime=00:01:04 "
    "TimeLimit=00:01:00 TimeMin=N/A SubmitTime=2026-11-26T08:49:48 AllocNode:Sid=localhost:2310 "
    "NtasksPerN:B:S:C=0:0:*:* CPUs/Task=1 Comment=https://ci.example.org/jobs/1 two words "
    "Command=(null) WorkDir=/var/tmp/x StdOut=/var/tmp/x/output.log Power=")


class Scripted:
    """A command runner that answers from a list and records what it was asked."""

    def __init__(self, *answers: CommandResult | BaseException) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[list[str], bytes | None]] = []

    async def __call__(self, argv: Sequence[str], *, timeout: float,
                       stdin: bytes | None = None) -> CommandResult:
        self.calls.append((list(argv), stdin))
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def ok(stdout: str = "", stderr: str = "") -> CommandResult:
    return CommandResult(0, stdout, stderr)


def error(stderr: str, code: int = 1) -> CommandResult:
    return CommandResult(code, "", stderr)


async def test_sbatch_gives_the_script_on_stdin_and_returns_the_id() -> None:
    run = Scripted(ok("4711\n"), ok("4712;cluster-a\n"))
    cli = SlurmCli(run)
    assert await cli.sbatch("#!/bin/bash\ntrue\n", ["--parsable", "--job-name=hpcr-x"]) == "4711"
    assert run.calls[0] == (["sbatch", "--parsable", "--job-name=hpcr-x"], b"#!/bin/bash\ntrue\n")
    assert await cli.sbatch("#!/bin/bash\n", ["--parsable"]) == "4712"
    assert cli.commands["sbatch"] == 2


async def test_a_refused_submission_carries_slurms_exact_words() -> None:
    message = ("sbatch: error: invalid partition specified: nope\n"
               "sbatch: error: Batch job submission failed: Invalid partition name specified\n")
    cli = SlurmCli(Scripted(error(message)))
    with pytest.raises(SubmissionFailed) as refused:
        await cli.sbatch("#!/bin/bash\n", ["--parsable"])
    assert refused.value.slurm_message == message.strip()


async def test_an_unreachable_controller_is_not_a_refusal() -> None:
    down = ("sbatch: error: Batch job submission failed: "
            "Unable to contact slurm controller (connect failure)\n")
    cli = SlurmCli(Scripted(error(down), ok("garbage\n"), TimeoutError(),
                            FileNotFoundError(2, "No such file")))
    for _ in range(4):
        with pytest.raises(SlurmUnavailable):
            await cli.sbatch("#!/bin/bash\n", ["--parsable"])
    with pytest.raises(ValueError):
        await cli.sbatch("#!/bin/bash\n", [])


async def test_squeue_asks_once_for_all_ids_in_every_state() -> None:
    # As squeue 22.05 prints SQUEUE_FORMAT; exit_code is a raw wait status.
    out = ("12|RUNNING|None|2026-11-26T08:52:45|10:00|0|0|hpcr-a|vm|ci-1\n"
           "13|PENDING|Resources|N/A|4:00:00|0|1|hpcr-b||https://x/y|z\n"
           "14|FAILED|NonZeroExitCode|2026-11-26T08:50:00|10:00|768|0|hpcr-c|cn[01-04,07]|\n"
           "15|TIMEOUT|TimeLimit|2026-11-26T08:49:49|1:00|15|0|hpcr-d|cn02|(null)\n")
    run = Scripted(ok(out))
    rows = await SlurmCli(run).squeue(["12", "13", "14", "15", "16"])
    (argv, _), = run.calls
    assert argv[0] == "squeue" and "--states=all" in argv and "--jobs=12,13,14,15,16" in argv
    assert rows == {
        "12": SqueueRow("12", "RUNNING", "None", "2026-11-26T08:52:45", "hpcr-a", "ci-1",
                        "10:00", "0:0", False, "vm"),
        "13": SqueueRow("13", "PENDING", "Resources", None, "hpcr-b", "https://x/y|z",
                        "4:00:00", "0:0", True, None),
        "14": SqueueRow("14", "FAILED", "NonZeroExitCode", "2026-11-26T08:50:00", "hpcr-c", "",
                        "10:00", "3:0", False, "cn[01-04,07]"),
        "15": SqueueRow("15", "TIMEOUT", "TimeLimit", "2026-11-26T08:49:49", "hpcr-d", "(null)",
                        "1:00", "0:15", False, "cn02"),
    }


async def test_squeue_reads_a_pending_jobs_reason_and_a_running_jobs_nodes() -> None:
    # As squeue 22.05 prints them on the development cluster: a pending job has no nodes yet.
    out = ("20|PENDING|QOSMaxJobsPerUserLimit|2026-11-26T10:00:00|1:00|0|1|hpcr-e||ci 20\n"
           "21|PENDING|Priority|N/A|1:00|0|1|hpcr-f|(null)|\n"
           "22|RUNNING|None|2026-11-26T09:00:00|1:00|0|1|hpcr-g|vm|\n")
    rows = await SlurmCli(Scripted(ok(out))).squeue(["20", "21", "22"])
    assert [(row.reason, row.node_list) for row in rows.values()] == [
        ("QOSMaxJobsPerUserLimit", None), ("Priority", None), ("None", "vm")]
    assert rows["20"].comment == "ci 20" and rows["20"].start == "2026-11-26T10:00:00"


async def test_squeue_of_one_unknown_id_is_an_answer_not_a_failure() -> None:
    # squeue 22.05 exits 1 for a single unknown id, and 0 (listing the known ones) for several.
    cli = SlurmCli(Scripted(error(INVALID_ID), error(INVALID_ID), ok("")))
    assert await cli.squeue(["99999"]) == {}
    with pytest.raises(SlurmUnavailable):
        await cli.squeue(["99998", "99999"])
    assert await cli.squeue(["99998", "99999"]) == {}
    assert await SlurmCli(Scripted()).squeue([]) == {}


async def test_squeue_failures_are_unavailable() -> None:
    for answer in (error("slurm_load_jobs error: Unable to contact slurm controller (connect failure)"),
                   ok("this is not squeue's output\n"), TimeoutError()):
        with pytest.raises(SlurmUnavailable):
            await SlurmCli(Scripted(answer)).squeue(["1", "2"])


async def test_squeue_start_reads_estimates() -> None:
    cli = SlurmCli(Scripted(ok("40|2026-11-26T09:52:44\n39|N/A\n")))
    assert await cli.squeue_start(["39", "40"]) == {"40": "2026-11-26T09:52:44", "39": None}


async def test_show_job_parses_the_record_and_knows_unknown_jobs() -> None:
    cli = SlurmCli(Scripted(ok(SCONTROL_LINE + "\n"), error(INVALID_ID), ok("JobId=29 JobState=RUNNING\n")))
    record = await cli.show_job("28")
    assert record is not None
    assert (record["JobState"], record["ExitCode"], record["Requeue"], record["TimeLimit"]) == (
        "TIMEOUT", "0:15", "0", "00:01:00")
    assert record["Comment"] == "https://ci.example.org/jobs/1 two words"
    assert record["AllocNode:Sid"] == "localhost:2310" and record["Power"] == ""
    assert await cli.show_job("30") is None
    with pytest.raises(SlurmUnavailable):
        await cli.show_job("28")  # a record of another job is not an answer about this one


async def test_scancel_signals_and_treats_finished_jobs_as_nothing_to_do() -> None:
    run = Scripted(ok(stderr="scancel: Terminating job 30\n"), ok(),
                   # scancel 22.05 exits 0 here; only --verbose makes it say why.
                   ok(stderr="scancel: Terminating job 30\n"
                             "scancel: error: Kill job error on job id 30: "
                             "Job/step already completing or completed\n"),
                   error("scancel: error: Unable to contact slurm controller (connect failure)"))
    cli = SlurmCli(run)
    assert await cli.scancel("30", signal="TERM") is True
    assert await cli.scancel("30", signal="TERM", full=True) is True
    assert await cli.scancel("30") is False
    with pytest.raises(SlurmUnavailable):
        await cli.scancel("30")
    assert [argv for argv, _ in run.calls] == [["scancel", "--verbose", "--signal=TERM", "30"],
                                               ["scancel", "--verbose", "--signal=TERM", "--full", "30"],
                                               ["scancel", "--verbose", "30"], ["scancel", "--verbose", "30"]]
    with pytest.raises(ValueError):
        await cli.scancel("30", signal="TERM; rm")


async def test_list_hpcr_jobs_keeps_only_ours() -> None:
    out = ("3|RUNNING|None|N/A|5:00|0|0|hpcr-a|vm|c\n4|PENDING|Priority|N/A|5:00|0|1|my-own-job||\n"
           "5|COMPLETED|None|N/A|5:00|0|0|hpcr-b|vm|\n")
    run = Scripted(ok(out))
    rows = await SlurmCli(run).list_hpcr_jobs("hpcrunner")
    assert [row.slurm_id for row in rows] == ["3", "5"]
    assert "--user=hpcrunner" in run.calls[0][0]
    with pytest.raises(ValueError):
        await SlurmCli(Scripted()).list_hpcr_jobs("-x")


async def test_ids_that_are_not_job_ids_never_reach_a_command() -> None:
    cli = SlurmCli(Scripted())
    for bad in ("1,2", "-j", "12_3", ""):
        with pytest.raises(ValueError):
            await cli.squeue([bad])
        with pytest.raises(ValueError):
            await cli.show_job(bad)


def test_scontrol_records_with_spaces_in_values() -> None:
    assert parse_scontrol_record("JobId=1 Comment=a b=c") == {"JobId": "1", "Comment": "a", "b": "c"}
    assert parse_scontrol_record("JobId=1 Comment=a b c Command=/x y") == {
        "JobId": "1", "Comment": "a b c", "Command": "/x y"}


async def test_the_subprocess_runner_times_out_and_kills_the_command() -> None:
    runner = SubprocessRunner(env={"PATH": "/usr/bin:/bin"})
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await runner([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.3)
    assert loop.time() - started < 5
    result = await runner([sys.executable, "-c", "import os, sys; print(os.environ['SLURM_TIME_FORMAT']); "
                                                 "print(sys.stdin.read(), file=sys.stderr); sys.exit(3)"],
                          timeout=30, stdin=b"script")
    assert result == CommandResult(3, "standard\n", "script\n")
    prefixed = SubprocessRunner(prefix=["env", "X=1"])
    printed = await prefixed([sys.executable, "-c", "import os; print(os.environ['X'])"], timeout=30)
    assert printed.stdout == "1\n"
