"""`hpc-runner demo`: the embedded default, end to end, on this machine."""
