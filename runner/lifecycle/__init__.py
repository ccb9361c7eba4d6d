"""A job's life, written once for every source and for `hpc-runner run` (docs/architecture.md):

- `admission`: the policy decides and the job is recorded (a local job's directory is copied);
- `prepare`: the image is verified, the sandbox planned and the job's files written;
- `driver`: the job runs locally or through Slurm (one retry after a node failure), its log
  streams to a sink, its end is recorded and reported once;
- `recovery`: what a restarted agent finds of the jobs of the previous one;
- `access`: who may see and cancel a job; `notes`: where the lifecycle's own lines go.
"""
