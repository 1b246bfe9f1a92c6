#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for the Slurm integration tests (tests/test_slurm.py)
# and for trying slurm/train.sbatch or `hydra/launcher=slurm` sweeps without a cluster.
#
#   bash slurm/local_cluster.sh start     install what is missing (Debian packages), write the configs,
#                                         start munged, MariaDB, slurmdbd, slurmctld, slurmd, and wait
#                                         until the node is idle. Idempotent: a second start is a no-op.
#   bash slurm/local_cluster.sh stop      stop the daemons that this script started (and nothing else)
#   bash slurm/local_cluster.sh status    which daemons run, and sinfo
#   bash slurm/local_cluster.sh restart   stop, then start
#
# Needs root and Debian/Ubuntu (Slurm 22.05 on Debian 12). No systemd: the daemons are started directly,
# in the foreground of their own session, and their pids are kept in $STATE_DIR/pids; `stop` signals only
# those pids (checked against the daemon's executable, so a recycled pid is never killed). A daemon of the
# same kind that runs already and was not started here (e.g. a system munged or MariaDB) is reused as is.
#
# The cluster: one node named after `hostname -s`, with CPUs/sockets/cores/RealMemory as `slurmd -C`
# reports them, at 127.0.0.1; one partition `debug` (the default); select/cons_tres with CR_CPU (jobs share
# the node by CPU, memory is not a consumable); no cgroups (proctrack/linuxproc, task/none); accounting in
# slurmdbd + MariaDB so that `sacct` works (submitit polls it to see finished and failed jobs); requeue
# enabled, and short credential/scheduler intervals so that a requeued job starts again within seconds.
#
# Environment: DT_SLURM_STATE (state dir, default /var/lib/diffusion_train-slurm),
#              DT_SLURM_TIMEOUT (seconds to wait for the node to come up, default 90).
set -euo pipefail
shopt -s extglob
export PATH="/usr/sbin:/usr/bin:/sbin:/bin:$PATH"   # the daemons live in /usr/sbin

STATE_DIR="${DT_SLURM_STATE:-/var/lib/diffusion_train-slurm}"
PID_DIR="$STATE_DIR/pids"
LOG_DIR="$STATE_DIR/logs"
TIMEOUT="${DT_SLURM_TIMEOUT:-90}"
CONF_DIR=/etc/slurm                 # where Debian's Slurm looks (slurm.conf, slurmdbd.conf)
SLURM_LOG_DIR=/var/log/slurm
CLUSTER=dtlocal
PARTITION=debug
DB_NAME=slurm_acct_db
MYSQL_SOCKET=/run/mysqld/mysqld.sock
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DAEMONS=(munged mariadb slurmdbd slurmctld slurmd)   # start order; stop runs in reverse

log() { echo "[local_cluster] $*"; }
die() { echo "[local_cluster] error: $*" >&2; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"; }

# ---------------------------------------------------------------------------------------------------
# Installation
# ---------------------------------------------------------------------------------------------------
install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]}"
    # Keep the packages' maintainer scripts from starting services (this script starts them itself).
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    local ok=0
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -q --no-install-recommends "${missing[@]}"; then
        ok=1
    else
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}" && ok=1
    fi
    [[ $made_policy -eq 1 ]] && rm -f "$policy"
    [[ $ok -eq 1 ]] || die "could not install ${missing[*]}"
}

# ---------------------------------------------------------------------------------------------------
# Daemon bookkeeping: pid files of the daemons this script started
# ---------------------------------------------------------------------------------------------------
exe_of() {  # the real executable that a daemon of this kind runs
    case $1 in
        munged) readlink -f "$(command -v munged || echo /usr/sbin/munged)" ;;
        mariadb) readlink -f "$(command -v mariadbd || echo /usr/sbin/mariadbd)" ;;
        *) readlink -f "$(command -v "$1" || echo "/usr/sbin/$1")" ;;
    esac
}

our_pid() {  # prints the pid of our running daemon $1, or fails
    local f="$PID_DIR/$1.pid" pid exe
    [[ -f $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    # The executable recorded at start (or the expected one); one removed or replaced by a package upgrade
    # since reads "<path> (deleted)".
    exe=$(cat "$PID_DIR/$1.exe" 2>/dev/null || exe_of "$1")
    [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == "$exe"?(" (deleted)") ]] || return 1
    echo "$pid"
}

foreign_pid() {  # a running daemon of kind $1 that this script did not start
    local exe ours p
    exe=$(exe_of "$1"); ours=$(our_pid "$1" || true)
    for p in /proc/[0-9]*; do
        [[ ${p#/proc/} == "$ours" ]] && continue
        [[ $(readlink "$p/exe" 2>/dev/null) == "$exe" ]] && { echo "${p#/proc/}"; return 0; }
    done
    return 1
}

spawn() {  # spawn NAME CMD...: run CMD as a daemon in its own session, remember its pid
    local name=$1; shift
    mkdir -p "$PID_DIR" "$LOG_DIR"
    # Not a process-group leader here, so setsid execs in place: $! is the daemon itself. Every standard
    # stream is redirected: a daemon must not hold the caller's pipes open (pytest waits on them).
    # fd 9 (this script's lock) is closed, or the daemon would hold the lock for ever.
    setsid "$@" </dev/null >>"$LOG_DIR/$name.out" 2>&1 9>&- &
    echo $! >"$PID_DIR/$name.pid"
    exe_of "$name" >"$PID_DIR/$name.exe"
    local i
    for i in $(seq 1 50); do  # until it runs the daemon's executable (after setsid/setpriv exec it)
        our_pid "$name" >/dev/null && break
        kill -0 "$(<"$PID_DIR/$name.pid")" 2>/dev/null || { show_logs; die "$name exited at once (command: $*)"; }
        sleep 0.1
    done
    our_pid "$name" >/dev/null || { show_logs; die "$name did not start (command: $*)"; }
    log "started $name (pid $(<"$PID_DIR/$name.pid"))"
}

stop_daemon() {
    local name=$1 pid i
    if ! pid=$(our_pid "$name"); then
        rm -f "$PID_DIR/$name.pid" "$PID_DIR/$name.exe"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do  # up to 20 s
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) ignored SIGTERM for 20 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$PID_DIR/$name.pid" "$PID_DIR/$name.exe"
    log "stopped $name (pid $pid)"
}

show_logs() {
    local f
    for f in "$LOG_DIR"/*.out "$SLURM_LOG_DIR"/slurmctld.log "$SLURM_LOG_DIR"/slurmd.log \
             "$SLURM_LOG_DIR"/slurmdbd.log /var/log/munge/munged.log; do
        [[ -s $f ]] || continue
        echo "----- tail of $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

wait_for() {  # wait_for SECONDS WHAT CMD...: poll CMD until it succeeds
    local secs=$1 what=$2 i; shift 2
    for i in $(seq 1 $((secs * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    show_logs
    die "$what did not come up within ${secs}s (logs above)"
}

# ---------------------------------------------------------------------------------------------------
# munge
# ---------------------------------------------------------------------------------------------------
munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
    fi
    chown -R munge:munge /etc/munge && chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 711 /var/lib/munge
    install -d -o munge -g munge -m 700 /var/log/munge
    if our_pid munged >/dev/null || munge_works; then return 0; fi
    # munged refuses to run as root: run it as user munge.
    spawn munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
    wait_for 20 munged munge_works
}

# ---------------------------------------------------------------------------------------------------
# MariaDB (accounting storage for slurmdbd)
# ---------------------------------------------------------------------------------------------------
mysql_root() { mariadb --protocol=socket --socket="$MYSQL_SOCKET" -u root; }
mysql_up() { mariadb-admin --protocol=socket --socket="$MYSQL_SOCKET" -u root ping; }

start_mariadb() {
    install -d -o mysql -g mysql -m 755 /run/mysqld
    if ! our_pid mariadb >/dev/null && ! mysql_up >/dev/null 2>&1; then
        if [[ ! -d /var/lib/mysql/mysql ]]; then
            log "initialising the MariaDB data directory"
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql --auth-root-authentication-method=socket \
                >"$LOG_DIR/mariadb-install.out" 2>&1 || { cat "$LOG_DIR/mariadb-install.out" >&2; die "mariadb-install-db failed"; }
        fi
        # The unix socket only (no TCP port that could clash with another server).
        spawn mariadb "$(command -v mariadbd)" --user=mysql --datadir=/var/lib/mysql --socket="$MYSQL_SOCKET" \
            --skip-networking --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900
        wait_for 60 MariaDB mysql_up
    fi
    # The slurm DB user authenticates by its unix user over the socket: no password anywhere.
    mysql_root <<SQL
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED VIA unix_socket;
GRANT ALL ON $DB_NAME.* TO 'slurm'@'localhost';
SQL
}

# ---------------------------------------------------------------------------------------------------
# Slurm configs
# ---------------------------------------------------------------------------------------------------
node_name() { hostname -s 2>/dev/null || uname -n | cut -d. -f1; }

write_if_changed() {  # write_if_changed FILE MODE OWNER < content; returns 0 if the file changed
    local file=$1 mode=$2 owner=$3 tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [[ -f $file ]] && cmp -s "$tmp" "$file"; then
        rm -f "$tmp"; chmod "$mode" "$file"; chown "$owner" "$file"
        return 1
    fi
    install -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$tmp" "$file"
    rm -f "$tmp"
    log "wrote $file"
    return 0
}

CONFIG_CHANGED=0
write_configs() {
    local node hw
    node=$(node_name)
    # The node's hardware as slurmd sees it; RealMemory must not exceed what it reports.
    hw=$(slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]* //')
    [[ $hw == *CPUs=* && $hw == *RealMemory=* ]] || die "unexpected 'slurmd -C' output: $(slurmd -C)"
    mkdir -p "$CONF_DIR"
    install -d -o slurm -g slurm -m 755 /var/lib/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd "$SLURM_LOG_DIR"

    if write_if_changed "$CONF_DIR/slurm.conf" 644 root:root <<EOF; then CONFIG_CHANGED=1; fi
# Written by slurm/local_cluster.sh: a single-node test cluster. Edits are overwritten by its next start.
ClusterName=$CLUSTER
SlurmctldHost=$node(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only after the job credential expired (default 120 s): 10 s here.
AuthInfo=cred_expire=10
MpiDefault=none
# No cgroups in containers: track processes by their parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
SchedulerType=sched/backfill
# Schedule every 2 s (default 60) and backfill every 1 s (default 30), so jobs start within seconds.
SchedulerParameters=sched_interval=2,bf_interval=1
JobRequeue=1
ReturnToService=2
MinJobAge=30
KillWait=10
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$SLURM_LOG_DIR/slurmctld.log
SlurmdLogFile=$SLURM_LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=$node NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF

    if write_if_changed "$CONF_DIR/slurmdbd.conf" 600 slurm:slurm <<EOF; then CONFIG_CHANGED=1; fi
# Written by slurm/local_cluster.sh. Accounting in the local MariaDB, over its unix socket.
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
SlurmUser=slurm
DebugLevel=info
LogFile=$SLURM_LOG_DIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StorageLoc=$DB_NAME
EOF

    # Lightning and torch.distributed resolve the node name (SLURM_NODELIST) to find the main process.
    if ! getent hosts "$node" >/dev/null; then
        log "'$node' does not resolve: adding '127.0.1.1 $node' to /etc/hosts"
        echo "127.0.1.1 $node" >>/etc/hosts
    fi
}

# ---------------------------------------------------------------------------------------------------
# Slurm daemons
# ---------------------------------------------------------------------------------------------------
dbd_up() { sacctmgr -n -P list cluster format=cluster; }
ctld_up() { scontrol ping | grep -q "is UP"; }
node_state() { sinfo -h -n "$(node_name)" -o %T 2>/dev/null | head -n 1; }

start_slurm() {
    local f node state i resumed=0
    if [[ $CONFIG_CHANGED -eq 1 ]]; then
        for f in slurmd slurmctld slurmdbd; do
            if our_pid "$f" >/dev/null; then
                log "config changed: restarting $f"; stop_daemon "$f"
            elif foreign_pid "$f" >/dev/null; then
                log "warning: config changed but $f was not started by this script: restart it yourself"
            fi
        done
    fi
    if ! our_pid slurmdbd >/dev/null && ! foreign_pid slurmdbd >/dev/null; then
        spawn slurmdbd "$(command -v slurmdbd)" -D
    fi
    wait_for 60 slurmdbd dbd_up
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
        log "added cluster $CLUSTER to accounting"
    fi
    if ! our_pid slurmctld >/dev/null && ! foreign_pid slurmctld >/dev/null; then
        spawn slurmctld "$(command -v slurmctld)" -D
    fi
    wait_for 60 slurmctld ctld_up
    node=$(node_name)
    if ! our_pid slurmd >/dev/null && ! foreign_pid slurmd >/dev/null; then
        spawn slurmd "$(command -v slurmd)" -D -N "$node"
    fi
    # Wait until the node takes jobs. A node that was down (e.g. after an unclean stop) is resumed once.
    for i in $(seq 1 $((TIMEOUT * 5))); do
        state=$(node_state || true)
        case $state in
            idle|mixed|allocated|completing) log "node $node is $state; partition $PARTITION is up"; return 0 ;;
            down*|drain*|fail*)
                if [[ $resumed -eq 0 && $i -gt 10 ]]; then
                    log "node $node is $state: resuming it"
                    scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        sleep 0.2
    done
    show_logs
    sinfo -N -l >&2 || true
    scontrol show node "$node" >&2 || true
    die "node $node did not become idle within ${TIMEOUT}s (state: ${state:-unknown}; logs above)"
}

# ---------------------------------------------------------------------------------------------------
lock() {  # one start/stop at a time (concurrent test sessions may all call start)
    mkdir -p "$STATE_DIR" "$PID_DIR" "$LOG_DIR"
    exec 9>"$STATE_DIR/lock"
    flock -w 600 9 || die "another local_cluster.sh still holds $STATE_DIR/lock after 600 s"
}

cmd_start() {
    need_root
    lock
    install_packages
    write_configs
    start_munge
    start_mariadb
    start_slurm
}

cmd_stop() {
    need_root
    lock
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        stop_daemon "${DAEMONS[i]}"
    done
}

cmd_status() {
    local d pid rc=0
    for d in "${DAEMONS[@]}"; do
        if pid=$(our_pid "$d"); then
            printf '%-10s running (pid %s, started by local_cluster.sh)\n' "$d" "$pid"
        elif pid=$(foreign_pid "$d"); then
            printf '%-10s running (pid %s, not started by local_cluster.sh)\n' "$d" "$pid"
        else
            printf '%-10s not running\n' "$d"; rc=1
        fi
    done
    if command -v sinfo >/dev/null; then sinfo || rc=1; fi
    return $rc
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    restart) cmd_stop; cmd_start ;;
    logs) show_logs 2>&1 ;;
    *) echo "usage: $0 start|stop|status|restart|logs" >&2; exit 2 ;;
esac
