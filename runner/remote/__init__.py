"""`hpc-runner remote`: a CI step's client of the hub's jobs API (submit, follow, cancel, look)."""
