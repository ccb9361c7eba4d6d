"""`python -I -m sandbox.mpiexec_launcher ...`: the launcher of a `[job.mpi] launch = "inside"` job
(see sandbox.mpiexec), a module of its own so that running it does not import it twice."""

from __future__ import annotations

import sys

from sandbox.mpiexec import main

if __name__ == "__main__":
    sys.exit(main())
