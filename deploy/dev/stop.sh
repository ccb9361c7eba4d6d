#!/usr/bin/env bash
# Stops the local test cluster's daemons started by setup.sh: the two-node cluster's slurmd nodes
# and slurmctld (its network namespaces stay, without processes), slurmd and slurmctld, then the
# accounting daemons (slurmdbd, MariaDB), then munged, which the Slurm daemons authenticate with.
# Idempotent: succeeds when nothing runs. Running jobs' processes are not touched.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$SCRIPT_DIR/lib.sh"
# shellcheck source-path=SCRIPTDIR source=two-nodes.sh
. "$SCRIPT_DIR/two-nodes.sh"

require_root
two_nodes_stop
stop_daemon slurmd
stop_daemon slurmctld
stop_daemon slurmdbd
stop_daemon mariadbd
stop_daemon munged
log "stopped; start again with deploy/dev/setup.sh"
