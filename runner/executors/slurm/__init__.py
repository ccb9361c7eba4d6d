"""The Slurm executor: prepared jobs as Slurm batch jobs, each inside the Apptainer sandbox.

- `plan`: the sbatch arguments and batch script (pure, pinned by golden files);
- `states`: what Slurm's job states mean for a CI job (pure);
- `cli`: the only module that runs Slurm's commands;
- `tracker`: one squeue call per polling cycle for every tracked job;
- `executor`: submit, watch, cancel, reconcile after a restart.
"""

from runner.executors.slurm.cli import (
    SlurmCli,
    SlurmUnavailable,
    SqueueRow,
    SubmissionFailed,
    SubprocessRunner,
)
from runner.executors.slurm.executor import QueueLimit, Reconciliation, SlurmExecutor, SlurmJob
from runner.executors.slurm.plan import SlurmSite, SubmitOptions

__all__ = [
    "QueueLimit",
    "Reconciliation",
    "SlurmCli",
    "SlurmExecutor",
    "SlurmJob",
    "SlurmSite",
    "SlurmUnavailable",
    "SqueueRow",
    "SubmissionFailed",
    "SubmitOptions",
    "SubprocessRunner",
]
