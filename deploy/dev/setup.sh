#!/usr/bin/env bash
# Sets up the local test cluster on Debian bookworm (run as root): system packages, Apptainer from
# Debian sid in a private glibc prefix, the hpcrunner service account and two test users, munge,
# Slurm accounting (MariaDB and slurmdbd, with the test accounts), a one-node Slurm cluster and,
# beside it, a two-node one in network namespaces (two-nodes.sh), the MPI test image, the project's
# virtual environment and a wheelhouse of its dependencies.
#
# Idempotent: every step checks what is already in place, so a second run takes seconds.
# Environment: HPC_RUNNER_DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail
umask 022

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd "$SCRIPT_DIR/../.." && pwd -P)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$SCRIPT_DIR/lib.sh"
# shellcheck source-path=SCRIPTDIR source=two-nodes.sh
. "$SCRIPT_DIR/two-nodes.sh"

DEBIAN_MIRROR=${HPC_RUNNER_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=/var/cache/hpc-runner-dev
SID_APT=$CACHE/sid-apt
IMAGES=$CACHE/images
IMAGE=$IMAGES/hpc-runner-test.sif
# The MPI test programs are the ones the package bundles for its demo image.
IMAGE_SOURCES=$REPO/runner/bundled
IMAGE_SUITE=bookworm

APPTAINER_SERIES=1.4
GLIBC_PREFIX=/opt/hpc-runner-deps/glibc-sid
GLIBC_LIB=$GLIBC_PREFIX/usr/lib/x86_64-linux-gnu
APPTAINER_STARTER=/usr/lib/x86_64-linux-gnu/apptainer/bin/starter

SERVICE_USER=hpcrunner
SERVICE_HOME=/var/lib/hpcrunner

# Users of the local queue tests (user:group, the group being the user's primary group). Tests
# create them too if missing, the same way.
TEST_USERS=(hpcr-alice:hpcr-esm hpcr-bob:hpcr-ocean)

SLURM_CONF=/etc/slurm/slurm.conf
SLURMDBD_CONF=/etc/slurm/slurmdbd.conf
CLUSTER=hpc-runner-dev
NODE=$(hostname -s)

# Slurm accounting: MariaDB (unix socket only) holds slurmdbd's database; slurmdbd connects as the
# database user named after the Unix user it runs as, authenticated by the socket (no password).
SLURM_USER=slurm
MARIADB_SOCKET=/run/mysqld/mysqld.sock
MARIADB_DATADIR=/var/lib/mysql
MARIADB_LOG=/var/log/mysql/error.log
ACCT_DB=slurm_acct_db
# Slurm accounts, and user:accounts associations (the first account is the user's default).
# Jobs of a user without an association, or with another account, are rejected.
SLURM_ACCOUNTS=(hpcr-test esm ocean local demo)
SLURM_ASSOCIATIONS=(
    "$SERVICE_USER:hpcr-test,esm,ocean,local,demo"
    "root:hpcr-test,esm,ocean,local,demo"
    "hpcr-alice:hpcr-test,esm"
    "hpcr-bob:hpcr-test,ocean"
)

VENV=/opt/hpc-runner/venv
SYSTEM_PYTHON=/usr/bin/python3
# Wheels of the project's build requirements and runtime dependencies (with theirs), from which
# tests/integration/test_wheel_install.py installs the project's wheel into a fresh venv offline.
WHEELHOUSE=$CACHE/wheelhouse

PACKAGES=(
    slurm-wlm slurmdbd mariadb-server munge openmpi-bin libopenmpi-dev
    debootstrap squashfs-tools squashfuse fuse3 fuse2fs uidmap patchelf containernetworking-plugins
    libseccomp2 libsqlite3-0 ca-certificates debian-archive-keyring
    python3-venv python3-dev sqlite3 git iproute2 procps gcc make
    # promtool checks deploy/prometheus/alerts.yml (tests/unit/test_metrics.py).
    prometheus
    # The web dashboard's tests drive a headless Chromium through chromedriver (tests/browser).
    chromium chromium-driver
    # tests/integration/test_systemd_units.py boots the units of deploy/systemd in systemd-nspawn
    # (its Debian root it debootstraps itself, cached in $CACHE).
    systemd-container
)

# Temporary paths removed on exit, whatever happens.
CLEANUP=()
cleanup() {
    local path
    for path in "${CLEANUP[@]}"; do
        rm -rf -- "$path"
    done
}
trap cleanup EXIT

step() { log "[$((SECONDS))s] $*"; }

# update_file PATH MODE OWNER TEXT: replace PATH by TEXT and a newline (written with MODE and OWNER
# before it takes PATH's place) unless PATH holds that already. Sets UPDATED to 1 when it replaced
# PATH, else 0.
UPDATED=0
update_file() {
    local path=$1 mode=$2 owner=$3 text=$4 new
    new=$(mktemp "$path.XXXXXX")
    CLEANUP+=("$new")
    printf '%s\n' "$text" >"$new"
    chown "$owner" "$new"
    chmod "$mode" "$new"
    if cmp -s "$new" "$path" && [[ $(stat -c %a:%U "$path") == "${mode#0}:${owner%%:*}" ]]; then
        UPDATED=0
    else
        mv "$new" "$path"
        UPDATED=1
    fi
}

# ---------------------------------------------------------------------------------------------
# a. Debian packages

missing_packages() {
    local pkg status
    for pkg in "${PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
        [[ $status == ii* ]] || printf '%s\n' "$pkg"
    done
}

apt_lists_fresh() {
    [[ -n $(find /var/lib/apt/lists -maxdepth 1 -name '*Release' -mtime -1 -print -quit 2>/dev/null) ]]
}

install_packages() {
    local missing
    mapfile -t missing < <(missing_packages)
    if ((${#missing[@]} > 0)) || ! apt_lists_fresh; then
        step "packages: apt-get update"
        apt-get update -q || warn "apt-get update reported errors; trying to continue"
    fi
    if ((${#missing[@]} == 0)); then
        step "packages: all ${#PACKAGES[@]} installed"
        return 0
    fi
    step "packages: installing ${missing[*]}"
    # Package scripts must not start daemons: this script starts them itself, with its own config.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        added_policy=1
    fi
    local status=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" || status=$?
    ((added_policy == 0)) || rm -f "$policy"
    ((status == 0)) || die "apt-get install failed (exit $status)"
    mapfile -t missing < <(missing_packages)
    ((${#missing[@]} == 0)) || die "packages still missing after apt-get install: ${missing[*]}"
}

# npm installs GitHub's OpenAPI description and webhook examples at test time. A machine may
# already have Node.js from elsewhere (with its own npm): Debian's npm would conflict with it.
install_npm() {
    if command -v npm >/dev/null; then
        step "npm: $(npm --version) already installed"
        return 0
    fi
    step "npm: installing Debian's npm"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends npm \
        || die "apt-get install npm failed"
}

# ---------------------------------------------------------------------------------------------
# b. Apptainer from Debian sid, run with sid's glibc from a private prefix

apptainer_installed() {
    local version
    version=$(apptainer --version 2>/dev/null) || return 1
    [[ $version == "apptainer version $APPTAINER_SERIES."* ]] || return 1
    [[ -x $APPTAINER_STARTER ]] || return 1
    [[ $(patchelf --print-interpreter "$APPTAINER_STARTER" 2>/dev/null) == "$GLIBC_LIB/ld-linux-x86-64.so.2" ]]
}

# Debian's .deb file name for PACKAGE VERSION (an epoch's colon is written %3a).
deb_file() { printf '%s_%s_amd64.deb' "$1" "${2//:/%3a}"; }

install_apptainer() {
    if apptainer_installed; then
        step "apptainer: $(apptainer --version) already installed"
        return 0
    fi
    step "apptainer: fetching apptainer and libc6 from Debian sid (private apt lists, sid is not added to the system)"
    mkdir -p "$SID_APT/lists/partial" "$SID_APT/cache/archives/partial" "$SID_APT/dl"
    printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s sid main\n' \
        "$DEBIAN_MIRROR" >"$SID_APT/sources.list"
    local apt_opts=(
        -o "Dir::Etc::SourceList=$SID_APT/sources.list"
        -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$SID_APT/lists"
        -o "Dir::Cache=$SID_APT/cache"
    )
    apt-get "${apt_opts[@]}" update -q || die "apt-get update of the private sid lists failed"

    local apptainer_version libc_version
    apptainer_version=$(apt-cache "${apt_opts[@]}" show --no-all-versions apptainer | awk '/^Version:/ {print $2; exit}')
    libc_version=$(apt-cache "${apt_opts[@]}" show --no-all-versions libc6 | awk '/^Version:/ {print $2; exit}')
    [[ -n $apptainer_version && -n $libc_version ]] || die "Debian sid lists have no apptainer or libc6 package"
    [[ $apptainer_version == "$APPTAINER_SERIES".* ]] ||
        die "Debian sid now has apptainer $apptainer_version, not $APPTAINER_SERIES.x; the recipe in $0 needs checking for that version"
    step "apptainer: sid has apptainer $apptainer_version, libc6 $libc_version"

    local apptainer_deb libc_deb
    apptainer_deb=$SID_APT/dl/$(deb_file apptainer "$apptainer_version")
    libc_deb=$SID_APT/dl/$(deb_file libc6 "$libc_version")
    # apt drops privileges to _apt for downloads; give it the directory.
    chown _apt:root "$SID_APT/dl" 2>/dev/null || true
    if [[ ! -s $apptainer_deb || ! -s $libc_deb ]]; then
        (cd "$SID_APT/dl" && apt-get "${apt_opts[@]}" -q download "apptainer=$apptainer_version" "libc6=$libc_version")
    fi
    [[ -s $apptainer_deb && -s $libc_deb ]] || die "download of $apptainer_deb and $libc_deb failed"

    step "apptainer: unpacking sid's glibc into $GLIBC_PREFIX"
    mkdir -p "$(dirname "$GLIBC_PREFIX")"
    rm -rf "$GLIBC_PREFIX.new"
    dpkg-deb -x "$libc_deb" "$GLIBC_PREFIX.new"
    rm -rf "$GLIBC_PREFIX"
    mv "$GLIBC_PREFIX.new" "$GLIBC_PREFIX"
    [[ -x $GLIBC_LIB/ld-linux-x86-64.so.2 ]] || die "sid's libc6 has no $GLIBC_LIB/ld-linux-x86-64.so.2"

    step "apptainer: unpacking apptainer $apptainer_version into /"
    # --no-overwrite-dir keeps the owner and mode of existing directories such as / and /usr.
    dpkg-deb --fsys-tarfile "$apptainer_deb" | tar -x -C / --no-overwrite-dir
    local binary
    for binary in /usr/bin/apptainer "$APPTAINER_STARTER"; do
        patchelf --set-interpreter "$GLIBC_LIB/ld-linux-x86-64.so.2" --set-rpath "$GLIBC_LIB" "$binary"
    done
    apptainer_installed || die "apptainer does not run after installation: $(apptainer --version 2>&1 || true)"
    step "apptainer: installed $(apptainer --version)"
}

enable_fuse() {
    if [[ ! -c /dev/fuse ]]; then
        mknod -m 0666 /dev/fuse c 10 229 || warn "cannot create /dev/fuse: unprivileged users cannot mount SIF images"
    fi
    if [[ -c /dev/fuse && $(stat -c %a /dev/fuse) != 666 ]]; then
        chmod 0666 /dev/fuse
        step "apptainer: /dev/fuse made usable by unprivileged users"
    fi
}

# ---------------------------------------------------------------------------------------------
# c. The service account

create_service_user() {
    local entry home shell
    if entry=$(getent passwd "$SERVICE_USER"); then
        home=$(cut -d : -f 6 <<<"$entry")
        shell=$(cut -d : -f 7 <<<"$entry")
        if [[ $home != "$SERVICE_HOME" || $shell != /bin/bash ]]; then
            step "user: $SERVICE_USER exists; setting home $SERVICE_HOME and shell /bin/bash"
            usermod --home "$SERVICE_HOME" --shell /bin/bash "$SERVICE_USER"
        else
            step "user: $SERVICE_USER exists"
        fi
    else
        step "user: creating system user $SERVICE_USER"
        useradd --system --user-group --home-dir "$SERVICE_HOME" --no-create-home --shell /bin/bash \
            --comment "hpc-runner service account" "$SERVICE_USER"
    fi
    install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$SERVICE_HOME"
}

# Users of the local queue tests: system users without a home or login shell, each in a group of
# its own as primary group.
create_test_users() {
    local entry user group
    for entry in "${TEST_USERS[@]}"; do
        user=${entry%%:*}
        group=${entry#*:}
        getent group "$group" >/dev/null || groupadd --system "$group"
        if ! getent passwd "$user" >/dev/null; then
            step "user: creating test user $user (group $group)"
            useradd --system --gid "$group" --no-create-home --home-dir /nonexistent \
                --shell /usr/sbin/nologin --comment "hpc-runner test user" "$user"
        elif [[ $(id -gn "$user") != "$group" ]]; then
            step "user: $user exists; setting its primary group to $group"
            usermod --gid "$group" "$user"
        fi
    done
    step "user: test users ${TEST_USERS[*]} exist"
}

# ---------------------------------------------------------------------------------------------
# d. munge

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        step "munge: creating /etc/munge/munge.key"
        install -d -m 0700 -o munge -g munge /etc/munge
        (umask 077 && dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none)
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    install -d -m 0755 -o munge -g munge /run/munge
    [[ -d /var/log/munge ]] || install -d -m 0700 -o munge -g munge /var/log/munge
    [[ -d /var/lib/munge ]] || install -d -m 0711 -o munge -g munge /var/lib/munge
    if daemon_running munged; then
        step "munge: munged running"
    else
        step "munge: starting munged"
        # --force: a socket left behind by a killed munged would otherwise stop it from starting.
        # shellcheck disable=SC2086  # the command line is words on purpose
        runuser -u munge -- ${DAEMON_COMMANDS[munged]} ||
            die "munged failed to start; see /var/log/munge/munged.log"
    fi
    wait_until 15 munge_works ||
        die "munge: 'munge -n | unmunge' fails; see /var/log/munge/munged.log"
    step "munge: credentials verify"
}

# ---------------------------------------------------------------------------------------------
# e. Slurm accounting: MariaDB and slurmdbd

render_mariadb_conf() {
    cat <<EOF
# Generated by deploy/dev/setup.sh: the MariaDB server holding Slurm's accounting database.
# The server reads only this file (mariadbd --defaults-file=...). Changes here are overwritten.
[mysqld]
user = mysql
datadir = $MARIADB_DATADIR
socket = $MARIADB_SOCKET
pid-file = ${DAEMON_PIDFILES[mariadbd]}
log-error = $MARIADB_LOG
# Local clients only, through the socket.
skip-networking
character-set-server = utf8mb4
collation-server = utf8mb4_general_ci
# What slurmdbd checks for at start-up (it logs an error below these values). The buffer pool is
# only an upper bound: memory is taken as the database grows.
innodb_buffer_pool_size = 1G
innodb_lock_wait_timeout = 900
EOF
}

mariadb_sql() { mariadb --defaults-file="$MARIADB_CONF" --socket="$MARIADB_SOCKET" -N -B "$@"; }
mariadb_answers() { mariadb_sql --connect-timeout=5 -e 'SELECT 1' >/dev/null 2>&1; }

start_mariadb() {
    install -d -m 0755 -o mysql -g mysql "$(dirname "$MARIADB_SOCKET")" "$(dirname "$MARIADB_LOG")"
    update_file "$MARIADB_CONF" 0644 root:root "$(render_mariadb_conf)"
    if ((UPDATED)); then
        step "mariadb: wrote $MARIADB_CONF"
        if daemon_running mariadbd; then
            # slurmdbd reconnects by itself once the server is back.
            step "mariadb: configuration changed; restarting it"
            stop_daemon mariadbd
        fi
    fi
    if [[ ! -d $MARIADB_DATADIR/mysql ]]; then
        step "mariadb: initialising $MARIADB_DATADIR"
        mariadb-install-db --defaults-file="$MARIADB_CONF" --auth-root-authentication-method=socket \
            --skip-test-db >/dev/null || die "mariadb-install-db failed"
    fi
    if daemon_running mariadbd; then
        step "mariadb: mariadbd running"
    else
        step "mariadb: starting mariadbd (log: $MARIADB_LOG)"
        # No systemd here: the server runs in the background in a session of its own, with no
        # terminal or pipe of this script's left open.
        # shellcheck disable=SC2086  # the command line is words on purpose
        (cd / && setsid -f ${DAEMON_COMMANDS[mariadbd]} </dev/null >/dev/null 2>&1) ||
            die "mariadbd failed to start; see $MARIADB_LOG"
    fi
    if ! wait_until 60 mariadb_answers; then
        tail -n 20 "$MARIADB_LOG" >&2 || true
        die "mariadb: the server does not answer on $MARIADB_SOCKET after 60 s"
    fi
    # Idempotent: the database, and its user authenticated as the Unix user of the same name.
    mariadb_sql <<EOF || die "mariadb: cannot create the database $ACCT_DB and its user $SLURM_USER"
CREATE DATABASE IF NOT EXISTS $ACCT_DB;
CREATE USER IF NOT EXISTS '$SLURM_USER'@'localhost' IDENTIFIED VIA unix_socket;
ALTER USER '$SLURM_USER'@'localhost' IDENTIFIED VIA unix_socket;
GRANT ALL PRIVILEGES ON $ACCT_DB.* TO '$SLURM_USER'@'localhost';
EOF
    step "mariadb: answers; database $ACCT_DB and its user $SLURM_USER in place"
}

render_slurmdbd_conf() {
    cat <<EOF
# Generated by deploy/dev/setup.sh: the accounting daemon of the test cluster.
# Changes here are overwritten on the next run.
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=$SLURM_USER
PidFile=${DAEMON_PIDFILES[slurmdbd]}
LogFile=/var/log/slurm/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$SLURM_USER
StorageLoc=$ACCT_DB
EOF
}

# sacctmgr, answering yes to its questions, with a deadline.
run_sacctmgr() { timeout 30 sacctmgr -i "$@"; }
slurmdbd_answers() { run_sacctmgr -n -P show cluster format=Cluster >/dev/null 2>&1; }

# Needs slurm.conf with the accounting settings: sacctmgr finds slurmdbd through it.
start_slurmdbd() {
    install -d -m 0755 -o slurm -g slurm /var/log/slurm /run/slurm
    # slurmdbd refuses a configuration file that others can read, or that is not its user's.
    update_file "$SLURMDBD_CONF" 0600 "$SLURM_USER:$SLURM_USER" "$(render_slurmdbd_conf)"
    if ((UPDATED)); then
        step "slurmdbd: wrote $SLURMDBD_CONF"
        if daemon_running slurmdbd; then
            step "slurmdbd: configuration changed; restarting it"
            stop_daemon slurmdbd
        fi
    fi
    if daemon_running slurmdbd; then
        step "slurmdbd: running"
    else
        step "slurmdbd: starting slurmdbd"
        ${DAEMON_COMMANDS[slurmdbd]} || die "slurmdbd failed to start; see /var/log/slurm/slurmdbd.log"
    fi
    if ! wait_until 60 slurmdbd_answers; then
        tail -n 20 /var/log/slurm/slurmdbd.log >&2 || true
        die "slurmdbd: 'sacctmgr show cluster' still fails after 60 s: $(run_sacctmgr -n show cluster 2>&1 || true)"
    fi
    step "slurmdbd: answers"
}

# join_commas WORD...: the words joined by commas.
join_commas() {
    local IFS=,
    printf '%s\n' "$*"
}

# ensure_associations [CLUSTER]: the cluster (default the one-node cluster), the accounts and the
# users' associations in it; only what is missing is added.
ensure_associations() {
    local CLUSTER=${1:-$CLUSTER}
    local clusters
    clusters=$(run_sacctmgr -n -P show cluster format=Cluster) || die "sacctmgr show cluster failed"
    if ! grep -qxF "$CLUSTER" <<<"$clusters"; then
        step "accounting: adding cluster $CLUSTER"
        run_sacctmgr add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
    fi

    local assocs missing=() account
    assocs=$(run_sacctmgr -n -P show association "cluster=$CLUSTER" format=Account,User) ||
        die "sacctmgr show association failed"
    for account in "${SLURM_ACCOUNTS[@]}"; do
        grep -qxF "$account|" <<<"$assocs" || missing+=("$account")
    done
    if ((${#missing[@]} > 0)); then
        step "accounting: adding accounts ${missing[*]}"
        run_sacctmgr add account "$(join_commas "${missing[@]}")" "cluster=$CLUSTER" \
            "description=hpc-runner test account" organization=hpc-runner >/dev/null ||
            die "sacctmgr add account ${missing[*]} failed"
    fi

    local entry user accounts defaults
    for entry in "${SLURM_ASSOCIATIONS[@]}"; do
        user=${entry%%:*}
        IFS=, read -r -a accounts <<<"${entry#*:}"
        if ! getent passwd "$user" >/dev/null; then
            warn "no Unix user $user; not giving it Slurm associations"
            continue
        fi
        missing=()
        for account in "${accounts[@]}"; do
            grep -qxF "$account|$user" <<<"$assocs" || missing+=("$account")
        done
        if ((${#missing[@]} > 0)); then
            step "accounting: associating $user with ${missing[*]}"
            run_sacctmgr add user "$user" "account=$(join_commas "${missing[@]}")" "cluster=$CLUSTER" \
                "defaultaccount=${accounts[0]}" >/dev/null || die "sacctmgr add user $user failed"
        fi
    done

    # The first account listed is each user's default; a user added earlier may have another.
    defaults=$(run_sacctmgr -n -P show user format=User,DefaultAccount) || die "sacctmgr show user failed"
    for entry in "${SLURM_ASSOCIATIONS[@]}"; do
        user=${entry%%:*}
        account=${entry#*:}
        account=${account%%,*}
        getent passwd "$user" >/dev/null || continue
        if ! grep -qxF "$user|$account" <<<"$defaults"; then
            step "accounting: setting $user's default account to $account"
            run_sacctmgr modify user where "name=$user" set "defaultaccount=$account" >/dev/null ||
                die "sacctmgr modify user $user failed"
        fi
    done
    step "accounting: cluster $CLUSTER, accounts ${SLURM_ACCOUNTS[*]} and their users in place"
}

# ---------------------------------------------------------------------------------------------
# f. Slurm

ensure_hostname_resolves() {
    if ! getent hosts "$NODE" >/dev/null; then
        step "slurm: adding $NODE to /etc/hosts (Slurm must resolve the node name)"
        printf '127.0.1.1\t%s\n' "$NODE" >>/etc/hosts
    fi
}

# The node's hardware as slurmd sees it ("slurmd -C"), so that the node never registers with
# fewer resources than configured (Slurm would drain it).
node_hardware() {
    local line
    line=$(slurmd -C 2>/dev/null | head -n 1) || true
    if [[ $line != NodeName=* ]]; then
        warn "slurmd -C failed; describing the node from nproc and free"
        line="NodeName=$NODE CPUs=$(nproc) RealMemory=$(free -m | awk '/^Mem:/ {print $2}')"
    fi
    printf '%s\n' "$line"
}

render_slurm_conf() {
    local hw cpus memory topology="" field
    hw=$(node_hardware)
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    memory=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    for field in Boards SocketsPerBoard CoresPerSocket ThreadsPerCore; do
        if [[ $hw =~ \ $field=([0-9]+) ]]; then
            topology+=" $field=${BASH_REMATCH[1]}"
        fi
    done
    [[ -n $cpus && -n $memory ]] || die "cannot tell the node's CPUs and memory from: $hw"
    # A little below the total, so that the node registers even if the kernel reserves more.
    local real_memory=$((memory * 95 / 100))
    cat <<EOF
# Generated by deploy/dev/setup.sh: a one-node cluster for hpc-runner's tests.
# Changes here are overwritten on the next run.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
AuthType=auth/munge
CredType=cred/munge
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=${DAEMON_PIDFILES[slurmctld]}
SlurmdPidFile=${DAEMON_PIDFILES[slurmd]}
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job that does not ask for memory would get the whole node's.
DefMemPerCPU=$((real_memory / cpus))

# Accounting through slurmdbd (sacct, sacctmgr). A job must be charged to an account its user is
# associated with (by default, the user's default account); any other is rejected at submission.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageEnforce=associations,limits
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none

# Finished jobs stay visible to squeue and scontrol for an hour (and to sacct for good).
MinJobAge=3600
ReturnToService=2
KillWait=10
# No mail on this machine.
MailProg=/bin/true
InactiveLimit=0

NodeName=$NODE CPUs=$cpus$topology RealMemory=$real_memory State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=4:00:00 State=UP
PartitionName=batch Nodes=$NODE MaxTime=1-00:00:00 State=UP
EOF
}

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1; }

# Polled by wait_until: true once the node accepts jobs; resumes it when down or drained.
LAST_RESUME=-100
node_ready() {
    local state
    state=$(node_state) || true
    case $state in
    idle | mixed | allocated | completing) return 0 ;;
    down | drain* | fail*)
        if ((SECONDS - LAST_RESUME >= 5)); then
            step "slurm: node $NODE is $state; resuming it"
            scontrol update "nodename=$NODE" state=resume 2>/dev/null || true
            LAST_RESUME=$SECONDS
        fi
        ;;
    esac
    return 1
}

# Writes slurm.conf, which sacctmgr needs to find slurmdbd; the Slurm daemons read it when
# start_slurm (re)starts them. Sets SLURM_CONF_CHANGED.
SLURM_CONF_CHANGED=0
write_slurm_conf() {
    ensure_hostname_resolves
    install -d -m 0755 -o root -g root /etc/slurm
    local conf
    # Rendered first: render_slurm_conf stops the script when it cannot describe the node.
    conf=$(render_slurm_conf)
    update_file "$SLURM_CONF" 0644 root:root "$conf"
    SLURM_CONF_CHANGED=$UPDATED
    if ((SLURM_CONF_CHANGED)); then
        step "slurm: wrote $SLURM_CONF"
    else
        step "slurm: $SLURM_CONF up to date"
    fi
}

# After start_slurmdbd and ensure_associations: slurmctld registers with slurmdbd when it starts,
# and the associations must be there before it enforces them.
start_slurm() {
    install -d -m 0755 -o slurm -g slurm /var/spool/slurmctld /var/log/slurm /run/slurm
    install -d -m 0755 -o root -g root /var/spool/slurmd

    if ((SLURM_CONF_CHANGED)) && { daemon_running slurmctld || daemon_running slurmd; }; then
        step "slurm: configuration changed; restarting the daemons"
        stop_daemon slurmd
        stop_daemon slurmctld
    fi
    if daemon_running slurmctld; then
        step "slurm: slurmctld running"
    else
        step "slurm: starting slurmctld"
        ${DAEMON_COMMANDS[slurmctld]} || die "slurmctld failed to start; see /var/log/slurm/slurmctld.log"
    fi
    if daemon_running slurmd; then
        step "slurm: slurmd running"
    else
        step "slurm: starting slurmd"
        ${DAEMON_COMMANDS[slurmd]} || die "slurmd failed to start; see /var/log/slurm/slurmd.log"
    fi

    if ! wait_until 60 node_ready; then
        tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
        die "slurm: node $NODE is '$(node_state || true)', not idle, after 60 s"
    fi
    step "slurm: node $NODE is $(node_state)"

    local user
    user=$(cd / && timeout 60 runuser -u "$SERVICE_USER" -- \
        srun --job-name=hpc-runner-setup-check --chdir="$SERVICE_HOME" --time=1 -N 1 -n 1 id -un) ||
        die "slurm: a one-task job of $SERVICE_USER did not run within 60 s"
    [[ $user == "$SERVICE_USER" ]] || die "slurm: test job ran as '$user', not $SERVICE_USER"
    step "slurm: a job of $SERVICE_USER ran"

    if srun --mpi=list 2>&1 | grep -qw pmix; then
        step "slurm: srun --mpi=list offers pmix"
    else
        warn "srun --mpi=list does not offer pmix; MPI jobs under Slurm will not start"
    fi
}

# ---------------------------------------------------------------------------------------------
# g. The MPI test image

# The image is rebuilt when anything that goes into it changes: the sources, the host MPI the
# programs are compiled against, or build_image itself.
image_inputs_hash() {
    {
        printf 'suite %s\n' "$IMAGE_SUITE"
        mpicc --showme:version 2>&1
        declare -f build_image
        local source
        for source in "$IMAGE_SOURCES"/*.c; do
            printf '%s ' "${source##*/}"
            sha256sum <"$source"
        done
    } | sha256sum | cut -d ' ' -f 1
}

build_image() {
    local build rootfs
    mkdir -p "$CACHE/debootstrap-debs"
    build=$(mktemp -d "$CACHE/build.XXXXXX")
    CLEANUP+=("$build")
    rootfs=$build/rootfs

    step "image: debootstrap --variant=minbase $IMAGE_SUITE (log: $build/debootstrap.log)"
    if ! debootstrap --variant=minbase --cache-dir="$CACHE/debootstrap-debs" \
        "$IMAGE_SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$build/debootstrap.log" 2>&1; then
        tail -n 30 "$build/debootstrap.log" >&2
        die "debootstrap failed"
    fi

    step "image: compiling the MPI test programs against the host's Open MPI"
    install -d -m 0755 "$rootfs/usr/local/bin"
    local source name
    for source in "$IMAGE_SOURCES"/*.c; do
        name=$(basename "$source" .c)
        mpicc -O2 -Wall -Wextra -Werror -o "$rootfs/usr/local/bin/$name" "$source"
    done
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    # The host's MPI is bind-mounted at run time; a copy inside the image would shadow it.
    if find "$rootfs" \( -name 'libmpi*' -o -name 'libopen-pal*' -o -name 'libpmix*' \) -print -quit | grep -q .; then
        die "the test image's root file system contains an MPI library"
    fi

    step "image: apptainer build"
    apptainer build --force "$build/image.sif" "$rootfs" >"$build/build.log" 2>&1 || {
        tail -n 30 "$build/build.log" >&2
        die "apptainer build failed"
    }
    chmod 0644 "$build/image.sif"
    mv "$build/image.sif" "$IMAGE"
}

ensure_image() {
    install -d -m 0755 "$CACHE" "$IMAGES"
    local want have=""
    want=$(image_inputs_hash)
    [[ -r $IMAGE.inputs ]] && have=$(<"$IMAGE.inputs")
    if [[ -s $IMAGE && $have == "$want" ]]; then
        step "image: $IMAGE up to date"
    else
        step "image: building $IMAGE"
        rm -f "$IMAGE.sha256" "$IMAGE.inputs"
        build_image
        printf '%s\n' "$want" >"$IMAGE.inputs"
    fi
    if [[ ! -s $IMAGE.sha256 || $IMAGE.sha256 -ot $IMAGE ]]; then
        sha256sum "$IMAGE" | cut -d ' ' -f 1 >"$IMAGE.sha256"
    fi
    chmod 0644 "$IMAGE" "$IMAGE.sha256" "$IMAGE.inputs"

    local os_release
    os_release=$(cd / && runuser -u "$SERVICE_USER" -- \
        apptainer exec --contain --cleanenv --no-home "$IMAGE" cat /etc/os-release 2>&1) ||
        die "image: $SERVICE_USER cannot run $IMAGE: $os_release"
    [[ $os_release == *"$IMAGE_SUITE"* ]] || die "image: $IMAGE is not Debian $IMAGE_SUITE: $os_release"
    step "image: $SERVICE_USER runs it (sha256 $(<"$IMAGE.sha256"))"
}

# ---------------------------------------------------------------------------------------------
# h. The project's virtual environment

venv_usable() {
    [[ -x $VENV/bin/python ]] &&
        grep -qx 'home = /usr/bin' "$VENV/pyvenv.cfg" 2>/dev/null &&
        "$VENV/bin/python" -c 'import sys' 2>/dev/null
}

install_project() {
    install -d -m 0755 "$(dirname "$VENV")"
    if venv_usable; then
        step "venv: $VENV exists"
    else
        step "venv: creating $VENV with $SYSTEM_PYTHON"
        rm -rf "$VENV"
        "$SYSTEM_PYTHON" -m venv "$VENV"
    fi

    # Build from a copy, so that setuptools' build/ and *.egg-info never land in the checkout.
    local src
    src=$(mktemp -d "$CACHE/src.XXXXXX")
    CLEANUP+=("$src")
    tar -C "$REPO" --exclude=./.git --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ \
        --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache -cf - . | tar -C "$src" -xf -

    local pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
    local deps_stamp=$VENV/.hpc-runner-deps deps_want deps_have=""
    deps_want=$(sha256sum <"$REPO/pyproject.toml" | cut -d ' ' -f 1)
    [[ -r $deps_stamp ]] && deps_have=$(<"$deps_stamp")
    if [[ $deps_have == "$deps_want" ]]; then
        step "venv: reinstalling hpc-runner from $REPO (dependencies unchanged)"
        "${pip[@]}" install --no-deps --force-reinstall "$src" || die "pip install of $REPO failed"
    else
        step "venv: installing hpc-runner[test] and its dependencies from $REPO"
        rm -f "$deps_stamp"
        # pip always reinstalls a project given as a directory, so this also refreshes hpc-runner.
        "${pip[@]}" install "${src}[test]" || die "pip install of ${REPO}[test] failed"
        printf '%s\n' "$deps_want" >"$deps_stamp"
    fi
    step "venv: hpc-runner $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("hpc-runner"))') installed"
}

# ---------------------------------------------------------------------------------------------
# i. The wheelhouse

# What pyproject.toml asks for to build the wheel and to run it, a requirement a line, after the
# interpreter's version (the wheels are this interpreter's).
wheelhouse_requirements() {
    "$SYSTEM_PYTHON" --version
    "$SYSTEM_PYTHON" - "$REPO/pyproject.toml" <<'EOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as file:
    project = tomllib.load(file)
print("\n".join(project["build-system"]["requires"] + project["project"]["dependencies"]))
EOF
}

# Filled again whenever those requirements change. The test installs from here alone (--no-index),
# so the fresh venv gets exactly what the wheel declares, and a dependency missing from
# pyproject.toml fails the test instead of being found installed.
fill_wheelhouse() {
    local stamp=$WHEELHOUSE/.requirements want have=""
    want=$(wheelhouse_requirements) || die "cannot read the requirements of $REPO/pyproject.toml"
    [[ -r $stamp ]] && have=$(<"$stamp")
    if [[ $have == "$want" ]]; then
        step "wheelhouse: $WHEELHOUSE up to date"
        return 0
    fi
    step "wheelhouse: pip wheel of the build requirements and runtime dependencies into $WHEELHOUSE"
    local new
    new=$(mktemp -d "$CACHE/wheelhouse.XXXXXX")
    CLEANUP+=("$new")
    # The first line is the interpreter's version, not a requirement.
    tail -n +2 <<<"$want" >"$new/requirements.txt"
    "$VENV/bin/python" -m pip --disable-pip-version-check -q wheel --wheel-dir "$new" \
        -r "$new/requirements.txt" || die "pip wheel of $REPO's requirements failed"
    printf '%s\n' "$want" >"$new/.requirements"
    chmod 0755 "$new"
    rm -rf "$WHEELHOUSE"
    mv "$new" "$WHEELHOUSE"
    step "wheelhouse: $(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels"
}

# ---------------------------------------------------------------------------------------------

main() {
    require_root
    # shellcheck disable=SC1091
    . /etc/os-release
    [[ ${VERSION_CODENAME:-} == bookworm ]] || die "this script supports Debian bookworm, not ${PRETTY_NAME:-unknown}"
    step "setup: repository $REPO"

    install_packages
    install_npm
    install_apptainer
    enable_fuse
    create_service_user
    create_test_users
    start_munge
    start_mariadb
    write_slurm_conf
    start_slurmdbd
    ensure_associations
    start_slurm
    two_nodes_up
    ensure_image
    install_project
    fill_wheelhouse

    log "---------------------------------------------------------------------------"
    log "apptainer: $(apptainer --version)"
    log "slurm:     $(sinfo --version) (node $NODE: $(node_state); partitions $(sinfo -h -o %P | tr '\n' ' '))"
    log "two nodes: $(SLURM_CONF=$TWO_NODES_CONF sinfo -h -N -o '%N %T %G' | tr '\n' ' ')(SLURM_CONF=$TWO_NODES_CONF)"
    log "accounts:  ${SLURM_ACCOUNTS[*]} (default $SERVICE_USER account: hpcr-test)"
    log "image:     $IMAGE"
    log "venv:      $VENV"
    log "wheels:    $WHEELHOUSE"
    log "setup done in ${SECONDS}s; stop the daemons with deploy/dev/stop.sh"
}

# two-nodes.sh sources this file for its helpers alone.
[[ -n ${HPC_RUNNER_SETUP_NO_MAIN:-} ]] || main "$@"
