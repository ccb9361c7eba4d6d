"""What a job is, whatever its source and executor: its id and the name of its Slurm job, its
states, how it ended, its record, and the prepared job an executor starts."""

from runner.job.ids import JOB_ID_PATTERN, SLURM_JOB_NAME_PREFIX, is_job_id, new_job_id, slurm_job_name
from runner.job.outcome import Ended, Outcome, OutcomeState
from runner.job.outputs import OUTPUTS_DIR, OutputFile
from runner.job.record import JobRecord
from runner.job.states import ACTIVE_STATES, TERMINAL_STATES, JobState

__all__ = [
    "ACTIVE_STATES",
    "JOB_ID_PATTERN",
    "OUTPUTS_DIR",
    "SLURM_JOB_NAME_PREFIX",
    "TERMINAL_STATES",
    "Ended",
    "JobRecord",
    "JobState",
    "Outcome",
    "OutcomeState",
    "OutputFile",
    "is_job_id",
    "new_job_id",
    "slurm_job_name",
]
