# Helpers shared by setup.sh and stop.sh (sourced, never executed).
# shellcheck shell=bash

log() { printf '== %s\n' "$*"; }
warn() { printf '== WARNING: %s\n' "$*" >&2; }
die() {
    printf '== ERROR: %s\n' "$*" >&2
    exit 1
}

require_root() {
    [[ $(id -u) -eq 0 ]] || die "$(basename "$0") must run as root (try: sudo $0)"
}

# wait_until SECONDS COMMAND...: run COMMAND every 0.2 s until it succeeds; return 1 after SECONDS.
wait_until() {
    local timeout=$1
    shift
    local deadline=$((SECONDS + timeout))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# Daemons this directory manages: name -> pid file, and name -> the command line setup.sh starts
# it with. The pid files are munged's default and the ones set in the generated MariaDB option
# file, slurmdbd.conf and slurm.conf.
# MariaDB runs from an option file of its own (--defaults-file: Debian's my.cnf is not read).
MARIADB_CONF=/etc/mysql/hpc-runner-dev.cnf
declare -gA DAEMON_PIDFILES=(
    [munged]=/run/munge/munged.pid
    [mariadbd]=/run/mysqld/mysqld.pid
    [slurmdbd]=/run/slurm/slurmdbd.pid
    [slurmctld]=/run/slurm/slurmctld.pid
    [slurmd]=/run/slurm/slurmd.pid
)
declare -gA DAEMON_COMMANDS=(
    [munged]="/usr/sbin/munged --force"
    [mariadbd]="/usr/sbin/mariadbd --defaults-file=$MARIADB_CONF"
    [slurmdbd]=/usr/sbin/slurmdbd
    [slurmctld]=/usr/sbin/slurmctld
    [slurmd]=/usr/sbin/slurmd
)

# daemon_pids NAME: the live process ids of daemon NAME: the one in its pid file or, when that file
# is missing or stale, processes named NAME whose command line is exactly the one setup.sh uses
# (so that other Slurm daemons on the machine, such as test nodes in their own namespaces, are
# never taken for ours).
daemon_pids() {
    local name=$1 pidfile=${DAEMON_PIDFILES[$1]} pid="" cmdline
    if [[ -r $pidfile ]] && read -r pid <"$pidfile" && [[ $pid =~ ^[0-9]+$ ]] &&
        [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; then
        printf '%s\n' "$pid"
        return 0
    fi
    for pid in $(pgrep -x -- "$name" || true); do
        cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || continue
        [[ $cmdline == "${DAEMON_COMMANDS[$name]} " ]] && printf '%s\n' "$pid"
    done
    return 0
}

daemon_running() { [[ -n $(daemon_pids "$1") ]]; }
daemon_stopped() { ! daemon_running "$1"; }

# stop_daemon NAME: SIGTERM, wait up to 30 s, then SIGKILL. Succeeds when nothing runs.
stop_daemon() {
    local name=$1 pids
    pids=$(daemon_pids "$name")
    if [[ -z $pids ]]; then
        log "$name: not running"
        return 0
    fi
    log "$name: stopping (pid $(echo "$pids" | tr '\n' ' ' | sed 's/ $//'))"
    # shellcheck disable=SC2086  # one pid per word
    kill -TERM $pids 2>/dev/null || true
    if ! wait_until 30 daemon_stopped "$name"; then
        warn "$name did not stop within 30 s; sending SIGKILL"
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        wait_until 5 daemon_stopped "$name" || die "$name (pid $pids) survived SIGKILL"
    fi
    rm -f "${DAEMON_PIDFILES[$name]}"
    log "$name: stopped"
}
