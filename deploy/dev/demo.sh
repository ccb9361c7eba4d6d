#!/usr/bin/env bash
# The main job on a fresh machine: sets up the local test cluster (setup.sh), then runs
# `hpc-runner demo` as the unprivileged service account, as production would run it.
# Run as root. Arguments go to `hpc-runner demo` (for example --keep).
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
bash "$SCRIPT_DIR/setup.sh"
cd /
exec runuser -u hpcrunner -- env -i HOME=/var/lib/hpcrunner LANG=C.UTF-8 \
    PATH=/opt/hpc-runner/venv/bin:/usr/local/bin:/usr/bin:/bin \
    /opt/hpc-runner/venv/bin/hpc-runner demo "$@"
