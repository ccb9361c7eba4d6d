"""hpc-runner: a CI agent for HPC clusters. How the code is built: docs/architecture.md."""

__version__ = "0.1.0"
