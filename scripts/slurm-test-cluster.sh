#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for testing the SLURM profile
# against a real scheduler (tests/test_slurm.py) or trying it by hand.
#
#   scripts/slurm-test-cluster.sh start    install slurm-wlm + munge if missing (apt, root),
#                                          write the configs and start munged, slurmctld, slurmd
#   scripts/slurm-test-cluster.sh stop     stop the daemons this script started (pid files)
#   scripts/slurm-test-cluster.sh status   print the daemons' pids and `sinfo`
#   scripts/slurm-test-cluster.sh env      print the `export SLURM_CONF=...` line for clients
#
# Everything lives in one state directory (MEDSSL_SLURM_STATE, default
# /tmp/medssl-slurm): configs, spool, logs, pid files and its own munge socket,
# so a system munged is left alone. One thing lives outside it: the symlink
# /etc/slurm/slurm.conf -> $STATE/etc/slurm.conf, because the executor plugin
# unsets every SLURM_* variable (SLURM_CONF too) before the srun inside each
# job, which then only finds the compiled-in default path. The script refuses
# to replace a slurm.conf that is not its own link, and `stop` removes the link.
# No systemd is assumed: the daemons are started directly, as root.
#
# Settings (environment):
#   MEDSSL_SLURM_STATE   state directory                   [/tmp/medssl-slurm]
#   MEDSSL_SLURM_PORT    slurmctld port; slurmd uses +1    [6817]
#   MEDSSL_SLURM_GPUS    fake GPUs advertised (gres)        [1]
#   MEDSSL_SLURM_MIN_JOB_AGE  seconds a finished job stays visible in squeue/scontrol [600]
#
# Accounting is light: no slurmdbd. Finished jobs are recorded by
# jobcomp/filetxt in $STATE/log/jobcomp.log, and Snakemake must be told
# `--slurm-status-command squeue` (see docs/slurm.md for why).
set -euo pipefail

STATE=${MEDSSL_SLURM_STATE:-/tmp/medssl-slurm}
PORT=${MEDSSL_SLURM_PORT:-6817}
GPUS=${MEDSSL_SLURM_GPUS:-1}
MIN_JOB_AGE=${MEDSSL_SLURM_MIN_JOB_AGE:-600}
HOST=$(hostname -s)
CONF=$STATE/etc/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf
MUNGE_SOCKET=$STATE/munge/munge.socket.2

die() {
    echo "slurm-test-cluster: error: $*" >&2
    exit 1
}
say() { echo "slurm-test-cluster: $*" >&2; }

install_packages() {
    local missing=()
    command -v munged > /dev/null || missing+=(munge)
    for binary in slurmctld slurmd sbatch; do
        if ! command -v "$binary" > /dev/null; then
            missing+=(slurm-wlm)
            break
        fi
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "need root to install ${missing[*]} (or install them yourself)"
    command -v apt-get > /dev/null || die "apt-get not found; install ${missing[*]} yourself"
    say "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout 600 apt-get install -y --no-install-recommends "${missing[@]}" > "$STATE/log/apt.log" 2>&1; then
        timeout 300 apt-get update >> "$STATE/log/apt.log" 2>&1 || true
        timeout 600 apt-get install -y --no-install-recommends "${missing[@]}" >> "$STATE/log/apt.log" 2>&1 ||
            die "apt-get install ${missing[*]} failed; see $STATE/log/apt.log"
    fi
}

# Real memory in MB, minus a margin: a node advertising more than it has is drained.
node_memory_mb() {
    local kb
    kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    echo $((kb / 1024 * 8 / 10))
}

write_configs() {
    local cpus mem
    # nproc obeys OMP_NUM_THREADS; the node must advertise the CPUs it really has.
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    mem=$(node_memory_mb)
    mkdir -p "$STATE/etc" "$STATE/ctld" "$STATE/spool" "$STATE/run" "$STATE/log"
    cat > "$CONF" << EOF
# Written by scripts/slurm-test-cluster.sh: a one-node test cluster.
ClusterName=medssl-test
SlurmctldHost=$HOST
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# Containers here have neither systemd nor usable cgroups.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# No slurmdbd: finished jobs go to a text file; squeue/scontrol keep them for MinJobAge s.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
MinJobAge=$MIN_JOB_AGE
ReturnToService=2
SlurmdTimeout=60
GresTypes=gpu
NodeName=$HOST CPUs=$cpus RealMemory=$mem Gres=gpu:fake:$GPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    # Fake GPUs: each is bound to a harmless character device (jobs then see
    # CUDA_VISIBLE_DEVICES); slurmd counts devices, so each needs its own file.
    local devices=(/dev/null /dev/zero /dev/full /dev/urandom)
    ((GPUS >= 1 && GPUS <= ${#devices[@]})) || die "MEDSSL_SLURM_GPUS must be 1..${#devices[@]}"
    : > "$STATE/etc/gres.conf"
    for device in "${devices[@]:0:GPUS}"; do
        echo "NodeName=$HOST Name=gpu Type=fake File=$device" >> "$STATE/etc/gres.conf"
    done
}

# Is the process in pid file $1 alive and named $2?
running() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(cat "$1")
    [[ -d /proc/$pid ]] && [[ $(cat "/proc/$pid/comm" 2> /dev/null) == "$2" ]]
}

link_system_conf() {
    if [[ -e $SYSTEM_CONF || -L $SYSTEM_CONF ]]; then
        [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]] && return 0
        die "$SYSTEM_CONF exists and is not a link to $CONF: a real SLURM is configured here; not touching it"
    fi
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -s "$CONF" "$SYSTEM_CONF"
}

unlink_system_conf() {
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]]; then
        rm -f "$SYSTEM_CONF"
    fi
}

start_munge() {
    if running "$STATE/run/munged.pid" munged; then
        return 0
    fi
    mkdir -p "$STATE/munge"
    chmod 0755 "$STATE"
    chown munge: "$STATE/munge"
    chmod 0755 "$STATE/munge"
    runuser -u munge -- test -w "$STATE/munge" ||
        die "the munge user cannot reach $STATE/munge (a parent directory is private?); set MEDSSL_SLURM_STATE"
    local key=/etc/munge/munge.key
    if [[ ! -s $key ]]; then
        # Debian's postinst creates the key; create one if it is missing.
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of="$key" status=none
        chown munge: "$key"
        chmod 0400 "$key"
    fi
    # munged refuses to run as root; run it as the munge user, pid file in the state dir.
    timeout 30 runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$key" \
        --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" \
        --seed-file="$STATE/munge/munged.seed" ||
        die "munged did not start; see $STATE/munge/munged.log"
    ln -sf "$STATE/munge/munged.pid" "$STATE/run/munged.pid"
    timeout 10 bash -c "until munge -S '$MUNGE_SOCKET' -n | unmunge -S '$MUNGE_SOCKET' > /dev/null 2>&1; do sleep 0.2; done" ||
        die "munge credentials do not round-trip through $MUNGE_SOCKET"
}

start_slurm() {
    export SLURM_CONF=$CONF
    if ! running "$STATE/run/slurmctld.pid" slurmctld; then
        # -c: start clean, no jobs or node state from an earlier cluster in this dir.
        timeout 60 slurmctld -c -f "$CONF" ||
            die "slurmctld did not start; see $STATE/log/slurmctld.log"
    fi
    if ! running "$STATE/run/slurmd.pid" slurmd; then
        timeout 60 slurmd -f "$CONF" ||
            die "slurmd did not start; see $STATE/log/slurmd.log"
    fi
    # The node must come up idle; a drained node would make sbatch wait forever.
    local deadline=$((SECONDS + 60)) node_state=""
    while ((SECONDS < deadline)); do
        node_state=$(timeout 10 sinfo -h -n "$HOST" -o %T 2> /dev/null || true)
        [[ $node_state == idle* ]] && break
        sleep 1
    done
    if [[ $node_state != idle* ]]; then
        timeout 10 sinfo -R >&2 || true
        die "node $HOST is '${node_state:-unknown}', not idle, after 60 s; see $STATE/log/"
    fi
    # One real job through the whole chain before anyone relies on it.
    local out
    out=$(timeout 60 srun -N1 -n1 --gpus=1 -t 1 bash -c 'echo "ok ${CUDA_VISIBLE_DEVICES:-}"') ||
        die "a test job with one GPU did not run; see $STATE/log/"
    [[ $out == ok* ]] || die "test job printed '$out'"
}

stop_daemon() {
    local pidfile=$1 name=$2 pid
    running "$pidfile" "$name" || return 0
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2> /dev/null || true
    for _ in $(seq 1 50); do
        [[ -d /proc/$pid ]] || return 0
        sleep 0.2
    done
    say "$name ($pid) did not stop on SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2> /dev/null || true
}

case ${1:-} in
start)
    mkdir -p "$STATE/log"
    install_packages
    write_configs
    link_system_conf
    start_munge
    start_slurm
    say "running: export SLURM_CONF=$CONF"
    ;;
stop)
    # slurmd first, so slurmctld does not mark the node down on the way out.
    stop_daemon "$STATE/run/slurmd.pid" slurmd
    stop_daemon "$STATE/run/slurmctld.pid" slurmctld
    stop_daemon "$STATE/run/munged.pid" munged
    unlink_system_conf
    ;;
status)
    for daemon in munged slurmctld slurmd; do
        if running "$STATE/run/$daemon.pid" "$daemon"; then
            echo "$daemon: running ($(cat "$STATE/run/$daemon.pid"))"
        else
            echo "$daemon: stopped"
        fi
    done
    SLURM_CONF=$CONF timeout 10 sinfo || true
    ;;
env)
    echo "export SLURM_CONF=$CONF"
    ;;
*)
    echo "usage: $0 start|stop|status|env" >&2
    exit 2
    ;;
esac
