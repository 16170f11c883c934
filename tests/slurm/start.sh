#!/usr/bin/env bash
# A one-node SLURM cluster (slurmctld + slurmd + slurmdbd/MariaDB for sacct, munge for auth) on
# this machine, for the tests: no systemd, no cgroups, everything under one directory; tasks bound to
# their cores (task/affinity).
#
#   eval "$(tests/slurm/start.sh [DIR])"   # prints `export SLURM_CONF=...`; DIR defaults to /tmp/infomax-slurm
#   tests/slurm/stop.sh [DIR]             # ends exactly the daemons started here
#
# Needs root (slurmd runs jobs as their users). Installs munge, slurm-wlm, slurmdbd and
# mariadb-server with apt-get when they are missing.
set -euo pipefail
D=${1:-/tmp/infomax-slurm}
log() { echo "slurm-test: $*" >&2; }
die() { log "$*"; for f in "$D"/log/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 15 "$f" >&2; }; done; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (slurmd starts jobs as their users)"
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v mariadbd >/dev/null; then
  log "installing munge slurm-wlm slurmdbd mariadb-server (apt-get)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      munge slurm-wlm slurmdbd mariadb-server; } >&2 || die "apt-get install failed"
fi

if [ -f "$D/pids" ]; then "$(dirname "$0")/stop.sh" "$D" >&2 || true; fi
rm -rf "$D"
mkdir -p "$D"/{munge,mysql,state,spool,log,run}
chmod 755 "$D" "$D/munge"   # munge's socket directory must be world-executable
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
DB_PORT=$(free_port); DBD_PORT=$(free_port); CTLD_PORT=$(free_port); SLURMD_PORT=$(free_port)
HOST=$(hostname -s)
start() {  # start NAME CMD...: run in the background, detached, and record the PID
  local name=$1; shift
  setsid "$@" >"$D/log/$name.out" 2>&1 < /dev/null &
  echo "$! $name" >> "$D/pids"
}
wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local limit=$1 what=$2; shift 2
  local end=$((SECONDS + limit))
  while [ $SECONDS -lt $end ]; do timeout 5 "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "timed out after ${limit}s waiting for $what"
}

# ---------------------------------------------------------------- munge
dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
chmod 0400 "$D/munge/munge.key"
start munged munged --foreground --force --key-file="$D/munge/munge.key" --socket="$D/munge/munge.socket" \
  --pid-file="$D/run/munged.pid" --log-file="$D/log/munged.log" --seed-file="$D/munge/seed"
wait_for 10 munged munge --socket="$D/munge/munge.socket" -n

# ---------------------------------------------------------------- MariaDB (private datadir, loopback port)
mariadb-install-db --no-defaults --user=root --datadir="$D/mysql" --auth-root-authentication-method=normal \
  --skip-test-db >"$D/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed"
start mariadbd mariadbd --no-defaults --user=root --datadir="$D/mysql" --socket="$D/run/mysql.sock" \
  --port="$DB_PORT" --bind-address=127.0.0.1 --skip-grant-tables --log-error="$D/log/mariadbd.log" \
  --pid-file="$D/run/mariadbd.pid" --innodb-buffer-pool-size=64M
wait_for 30 mariadbd python3 -c "import socket; socket.create_connection(('127.0.0.1', $DB_PORT), 1)"

# ---------------------------------------------------------------- configs
AUTH="AuthType=auth/munge
AuthInfo=socket=$D/munge/munge.socket,cred_expire=5"
cat > "$D/slurmdbd.conf" <<CONF
$AUTH
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=infomax_slurm_acct
PidFile=$D/run/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
CONF
chmod 0600 "$D/slurmdbd.conf"

read -r CPUS SOCKETS CORES THREADS MEM < <(slurmd -C | awk '/NodeName/ {
  for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
  print v["CPUs"], v["SocketsPerBoard"] * v["Boards"], v["CoresPerSocket"], v["ThreadsPerCore"], int(v["RealMemory"] * 0.9) }')
cat > "$D/slurm.conf" <<CONF
ClusterName=infomaxtest
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
$AUTH
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
# No cgroups on these machines. task/affinity binds each task to the cores it was given, as a real cluster
# does (task/cgroup or task/affinity): a task asking for too few cores gets exactly those.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
# Jobs share the node by cores and memory; without DefMemPerCPU a job takes all memory.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# scancel: SIGTERM, then SIGKILL after KillWait; a save on a loaded 2-core CI machine can take over 10 s
KillWait=30
MinJobAge=300
InactiveLimit=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# For connections to slurmdbd the munge socket is given here, not by AuthInfo.
AccountingStoragePass=$D/munge/munge.socket
JobCompType=jobcomp/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM State=UNKNOWN
# Preemption as a shared GPU cluster runs it: a job of a higher tier takes the cores of a debug job, which gets
# SIGTERM (not --signal's USR2) and GraceTime seconds to save before SLURM kills and requeues it.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 GraceTime=60
PartitionName=urgent Nodes=$HOST MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=2 PreemptMode=OFF
# Hidden, as a site's partitions for some groups are: sbatch takes it, plain sinfo does not list it
PartitionName=hidden Nodes=$HOST MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 Hidden=YES
CONF
export SLURM_CONF="$D/slurm.conf"

# ---------------------------------------------------------------- slurmdbd, cluster record, controller, node
start slurmdbd slurmdbd -D
wait_for 30 slurmdbd sacctmgr -n list cluster
sacctmgr -i add cluster infomaxtest >/dev/null 2>&1 || true
start slurmctld slurmctld -D -i
start slurmd slurmd -D
wait_for 60 "node $HOST to be idle" bash -c "sinfo -h -n $HOST -o %T | grep -qx idle"
log "cluster up in $D (node $HOST: $CPUS CPUs, ${MEM} MB)"
echo "export SLURM_CONF=$SLURM_CONF"
