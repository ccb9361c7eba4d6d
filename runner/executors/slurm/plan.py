"""The Slurm batch job for a prepared job: sbatch's arguments and the batch script, as data.

Pure: nothing here touches a file or runs a command, so golden files pin the output.

The sbatch arguments, and why each is there:

- `--parsable`: sbatch prints the job id alone (`ID` or `ID;cluster`), nothing to scrape.
- `--job-name=hpcr-<job id>` and `--comment=<CI job URL or id>`: Slurm is the source of truth
  for running work; a restarted agent finds its jobs by name (and people by comment).
- `--account`, `--partition`, `--nodes`, `--ntasks`, `--ntasks-per-node`, `--cpus-per-task`,
  `--gpus`, `--mem`, `--time`: exactly the policy decision's effective resources.
  `--gpus` counts GPUs for the whole job, as the policy's `gpus` does (select/cons_tres).
- `--chdir`, `--output`, `--error`: the job's directory, and the product's log file for both
  streams, so the agent tails one file whatever the job writes where.
- `--open-mode=append`: Slurm would otherwise truncate the log when the job starts, losing the
  lines the agent wrote into it while the job was pending (and, after a requeue, the first run).
- `--export=NONE`: the batch script gets none of the agent's environment (whatever the agent
  was started with, tokens included, stays out); only SLURM_* variables pass, as Slurm always
  passes them. The script exports what the launch needs itself, so the job's environment is
  the same on every node whatever the agent's was.
- `--no-requeue`: after a node failure Slurm would otherwise start the job again from the top,
  in a workspace the first run already changed, appending a second run to the log. With it, the
  job ends NODE_FAIL, the executor reports an infrastructure failure, and the agent decides
  whether to retry with a fresh workspace. (A job preempted under PreemptMode=REQUEUE is then
  cancelled rather than requeued, which the executor reports the same way.)

A job with `[job.mpi] launch = "inside"` runs its command once, in the batch script on the first
node of the allocation, under the mpiexec launcher (`sandbox.mpiexec`), which starts the ranks of
each `mpiexec` the command calls as an `srun` step of the same allocation; `SlurmSite.python` is
the interpreter that runs it, on a path every compute node must have.

The batch script runs the launch line from `sandbox.plan.plan_srun_launch` and writes the
launch's exit status atomically into the job's directory, where the executor reads it: the exit
code is then exact even without Slurm accounting, and known even when the job was killed by a
signal. That file is outside everything bound into the container, so a job cannot forge it.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from runner.job import slurm_job_name
from runner.job.prepared import PreparedJob
from runner.units import slurm_memory, slurm_time
from sandbox.mpiexec import MODULE as MPIEXEC_MODULE
from sandbox.plan import plan_srun_launch

__all__ = [
    "BATCH_SCRIPT_NAME",
    "COMMENT_MAX_CHARS",
    "EXIT_STATUS_NAME",
    "BatchJob",
    "SlurmSite",
    "SubmitOptions",
    "plan_batch",
    "sanitize_comment",
    "slurm_job_name",
]

BATCH_SCRIPT_NAME = "slurm.sh"
EXIT_STATUS_NAME = "exit-status"
# Slurm stores comments of any length, but they are shown in squeue and in people's terminals.
COMMENT_MAX_CHARS = 200
# `--begin` values as sbatch documents them: now+N[units], a time of day, or a date and time.
_BEGIN = re.compile(r"now(\+\d+((second|minute|hour|day|week)s?)?)?|[0-9][0-9:T-]*|midnight|noon|"
                    r"teatime|today|tomorrow")


@dataclass(frozen=True)
class SlurmSite:
    """How this site runs Slurm jobs (from the agent's config)."""

    srun: str = "srun"  # looked up on the job's PATH unless absolute
    mpi_plugin: str = "pmix"
    # Runs the mpiexec launcher of `launch = "inside"` jobs: the agent's own interpreter, which
    # the compute nodes must see at the same path (a shared venv, as in the dev cluster).
    python: str = sys.executable


@dataclass(frozen=True)
class SubmitOptions:
    """Per-submission choices that are not resources."""

    # sbatch --begin: do not start before this time (deferred jobs; tests make jobs pend with it).
    begin: str | None = None
    # sbatch --hold: submitted held, so it never starts until released (benchmarks).
    hold: bool = False

    def __post_init__(self) -> None:
        if self.begin is not None and not _BEGIN.fullmatch(self.begin):
            raise ValueError(f"begin {self.begin!r} is not a time sbatch --begin accepts")


@dataclass(frozen=True)
class BatchJob:
    """What to submit: `sbatch *args` with `script` as the batch script."""

    job_name: str
    args: tuple[str, ...]
    script: str
    script_path: str  # where the executor keeps a copy, for people
    status_path: str  # where the script writes the exit status


def sanitize_comment(text: str, limit: int = COMMENT_MAX_CHARS) -> str:
    """One line of printable ASCII, at most `limit` characters: a CI URL or job id passes as is.

    Control characters (newlines included) become spaces and other characters `?`, so the
    comment can never start a new line in squeue's output, in a terminal or in the script's
    header, whoever chose the CI job's URL.
    """
    if limit < 4:
        raise ValueError("limit must leave room for an ellipsis")
    cleaned = "".join(c if " " <= c <= "~" else (" " if c.isspace() or ord(c) < 32 or c == "\x7f" else "?")
                      for c in text).strip()
    return cleaned if len(cleaned) <= limit else cleaned[:limit - 3] + "..."


def plan_batch(job: PreparedJob, *, comment: str, site: SlurmSite = SlurmSite(),
               options: SubmitOptions = SubmitOptions()) -> BatchJob:
    """The sbatch arguments and batch script for a prepared job."""
    res = job.decision.slurm
    if not job.decision.allowed or res is None:
        raise ValueError("plan_batch needs an allowed decision")
    name = slurm_job_name(job.job_id)
    job_dir = PurePosixPath(job.job_dir)
    status_path = str(job_dir / EXIT_STATUS_NAME)
    args = [
        "--parsable",
        f"--job-name={name}",
        f"--comment={sanitize_comment(comment)}",
        f"--account={res.account}",
        f"--partition={res.partition}",
        f"--nodes={res.nodes}",
        f"--ntasks={res.tasks}",
    ]
    if res.tasks_per_node is not None:
        args.append(f"--ntasks-per-node={res.tasks_per_node}")
    args.append(f"--cpus-per-task={res.cpus_per_task}")
    if res.gpus > 0:
        args.append(f"--gpus={res.gpus}")
    if res.memory_mb is not None:
        args.append(f"--mem={slurm_memory(res.memory_mb)}")
    args += [
        f"--time={slurm_time(res.time_seconds)}",
        f"--chdir={job_dir}",
        f"--output={job.log_path}",
        f"--error={job.log_path}",
        "--open-mode=append",
        "--export=NONE",
        "--no-requeue",
    ]
    if options.begin is not None:
        args.append(f"--begin={options.begin}")
    if options.hold:
        args.append("--hold")
    launch = plan_srun_launch(job.plan, job.spec, job.decision, srun=site.srun, mpi_plugin=site.mpi_plugin,
                              python=site.python)
    script = _script(job, name=name, args=args, launch=launch, status_path=status_path)
    return BatchJob(job_name=name, args=tuple(args), script=script,
                    script_path=str(job_dir / BATCH_SCRIPT_NAME), status_path=status_path)


def _script(job: PreparedJob, *, name: str, args: Sequence[str], launch: Sequence[str],
            status_path: str) -> str:
    image = job.image
    digest = f"sha256:{image.sha256}" if image.sha256 else f"signed by {image.signer}"
    header = [
        f"hpc-runner job {job.job_id} ({job.spec.name}), Slurm job name {name}",
        f"image: {image.name} at {image.path}",
        f"image digest: {digest}",
        f"submitted as: sbatch {shlex.join(args)} < {BATCH_SCRIPT_NAME}",
    ]
    exports = [f"export {key}={shlex.quote(value)}" for key, value in sorted(job.plan.host_env.items())]
    lines = [
        "#!/bin/bash",
        *(f"# {_comment_text(line)}" for line in header),
        "#",
        "# Slurm starts this script with none of the agent's environment (--export=NONE): what",
        "# the launch needs is exported below. The job's own environment is the env file that",
        "# Apptainer reads inside the container (--cleanenv --env-file).",
        "set -u",
        "",
        "# The launcher's environment: PATH and the host MPI's settings for its launcher and ranks.",
        *exports,
        "",
        "# The agent reads the job's exit status from this file: exact without Slurm accounting.",
        "# A status left by an earlier run must never be taken for this run's.",
        f"status_file={shlex.quote(status_path)}",
        'rm -f -- "$status_file"',
        "",
        *_launch_lines(job, launch),
        "status=$?",
        "",
        "# Written under another name and renamed, so that a reader never sees half a number.",
        'printf \'%s\\n\' "$status" >"$status_file.tmp" && mv -f -- "$status_file.tmp" "$status_file"',
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def _comment_text(text: str) -> str:
    # Everything in a header line is data: it must not be able to end the comment.
    return sanitize_comment(text, limit=10_000)


def _launch_lines(job: PreparedJob, launch: Sequence[str]) -> list[str]:
    image = job.image.path
    if job.plan.mpiexec is None:
        return ["# The job itself, every rank inside the sandbox.",
                _command_lines(launch, job.plan.rank_wrapper, job.plan.argv, image)]
    return ["# The job's command, once, inside the sandbox, under the launcher that starts the ranks of",
            "# each of its mpiexec calls as a step of this allocation (srun below), each rank inside the",
            "# sandbox.",
            _inside_lines(launch, image)]


def _inside_lines(launch: Sequence[str], image: str) -> str:
    """The launcher's command line: its options one per line, its srun and rank launch as
    `_command_lines` shows a launch, then the job's command."""
    words = list(launch)
    at = words.index(MPIEXEC_MODULE) + 1
    groups: list[list[str]] = [words[:at]]
    while words[at] != "--":
        if words[at] in ("--launcher", "--ranks"):
            count = int(words[at + 1])
            part = words[at + 2:at + 2 + count]
            groups.append(words[at:at + 2])
            if words[at] == "--launcher":
                groups.append(part)
            else:
                split = part.index(image) if image in part else len(part)
                head = next((i for i, word in enumerate(part) if word.endswith("apptainer")), 0)
                if head:
                    groups.append(part[:head])
                groups += _option_groups(part[head:split])
                groups.append(part[split:])
            at += 2 + count
        else:
            groups.append(words[at:at + 2])
            at += 2
    command = words[at + 1:]
    split = command.index(image) if image in command else len(command)
    groups += [["--"], *_option_groups(command[:split]), command[split:]]
    return " \\\n    ".join(" ".join(shlex.quote(word) for word in group) for group in groups if group)


def _command_lines(launch: Sequence[str], wrapper: Sequence[str], argv: Sequence[str], image: str) -> str:
    """The launch as one shell command over several lines: srun and its options, the rank
    wrapper, Apptainer's options one per line, then the image and the job's command. Every word
    is quoted."""
    srun_part = list(launch[:len(launch) - len(wrapper) - len(argv)])
    groups = [srun_part]
    if wrapper:
        groups.append(list(wrapper))
    # The image path separates Apptainer's options from the job's command.
    split = argv.index(image) if image in argv else len(argv)
    groups += _option_groups(argv[:split])
    if split < len(argv):
        groups.append(list(argv[split:]))
    return " \\\n    ".join(" ".join(shlex.quote(word) for word in group) for group in groups)


def _option_groups(argv: Sequence[str]) -> list[list[str]]:
    """`argv` cut before each long option, so that a flag and its value share a line; the
    program keeps its global options and subcommand on its own line (`apptainer --quiet exec`)."""
    if not argv:
        return []
    head_end = next((i for i, word in enumerate(argv) if i > 0 and not word.startswith("-")), 0)
    groups = [list(argv[:head_end + 1])]
    for word in argv[head_end + 1:]:
        if word.startswith("--"):
            groups.append([word])
        else:
            groups[-1].append(word)
    return groups
