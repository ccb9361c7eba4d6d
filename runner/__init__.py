"""hpc-runner: a CI agent for HPC clusters."""

__version__ = "0.1.0"
