#!/usr/bin/env bash
# Stops the local test cluster's daemons (slurmd, slurmctld, munged) started by setup.sh.
# Idempotent: succeeds when nothing runs. Running jobs' processes are not touched.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=lib.sh
. "$SCRIPT_DIR/lib.sh"

require_root
stop_daemon slurmd
stop_daemon slurmctld
stop_daemon munged
log "stopped; start again with deploy/dev/setup.sh"
