"""Executors: how an allowed, planned job is run (a local process group, or a Slurm job)."""
