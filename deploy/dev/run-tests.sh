#!/usr/bin/env bash
# The project's test command: sets up the local test cluster (setup.sh), then runs ruff, mypy and
# pytest from the repository root with the tools of /opt/hpc-runner/venv. Arguments go to pytest.
# Exit status: pytest's, or 1 when ruff or mypy fail or when pytest collects no tests.
set -euo pipefail
umask 022

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd "$SCRIPT_DIR/../.." && pwd -P)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$SCRIPT_DIR/lib.sh"

VENV=/opt/hpc-runner/venv
# Tool caches live outside the checkout, one set per checkout.
CHECK_CACHE=/var/cache/hpc-runner-dev/check-cache/$(printf '%s' "$REPO" | sha256sum | cut -c 1-16)

require_root
log "run-tests: setting up the local test cluster"
bash "$SCRIPT_DIR/setup.sh"

cd "$REPO"
mkdir -p "$CHECK_CACHE"
failed=()

lint_paths=()
for path in runner sandbox tests bench; do
    [[ -e $path ]] && lint_paths+=("$path")
done
log "run-tests: ruff check ${lint_paths[*]}"
if ! RUFF_CACHE_DIR=$CHECK_CACHE/ruff "$VENV/bin/ruff" check "${lint_paths[@]}"; then
    failed+=(ruff)
fi

log "run-tests: mypy"
if ! MYPY_CACHE_DIR=$CHECK_CACHE/mypy "$VENV/bin/mypy"; then
    failed+=(mypy)
fi

log "run-tests: pytest $*"
status=0
HPC_RUNNER_TEST_CLUSTER=1 PYTHONDONTWRITEBYTECODE=1 \
    "$VENV/bin/python" -m pytest -v -p no:cacheprovider --durations=15 "$@" || status=$?
if ((status == 5)); then
    log "ERROR: pytest collected no tests; a run without tests is a failure"
    status=1
fi

if ((${#failed[@]} > 0)); then
    log "ERROR: ${failed[*]} failed"
    ((status != 0)) || status=1
fi
if ((status == 0)); then
    log "run-tests: all passed"
else
    log "run-tests: FAILED (exit $status)"
fi
exit "$status"
