#!/usr/bin/env bash
# Start a single-node Slurm on this machine for the `slurm` tests: munged, slurmctld and slurmd as plain
# daemons (no systemd, no cgroups), everything under DIR (default: a new temporary folder).
#
#   tests/slurm/start.sh [DIR]      prints `export SLURM_CONF=DIR/slurm.conf` once the node is idle
#   tests/slurm/stop.sh DIR         stops the three daemons
#
# Needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge) and root (slurmd starts each job
# as its owner). Free ports are picked, so it never collides with another Slurm on the machine.
set -euo pipefail
DIR=${1:-$(mktemp -d /tmp/geomask-slurm.XXXXXX)}
mkdir -p "$DIR"/{state,spool,log,munge}
DIR=$(cd "$DIR" && pwd)
for cmd in munged slurmctld slurmd sinfo; do
  command -v "$cmd" >/dev/null || { echo "start.sh: $cmd not found; apt-get install slurm-wlm munge" >&2; exit 3; }
done
[ "$(id -u)" = 0 ] || { echo "start.sh: slurmd must run as root" >&2; exit 3; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
NODE=$(hostname -s)
CPUS=${GEOMASK_SLURM_CPUS:-4}       # declared CPUs (config_overrides: may exceed the real ones), one per worker job
MEM_MB=${GEOMASK_SLURM_MEM_MB:-8000}

# A private munge: its own key and socket, so the machine's munge (if any) is not touched.
chmod 700 "$DIR/munge"
[ -f "$DIR/munge/munge.key" ] || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$DIR/munge/munge.key"
munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.sock" \
  --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"

cat >"$DIR/slurm.conf" <<CONF
ClusterName=geomask-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.sock
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerParameters=sched_interval=1
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$DIR/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"

for _ in $(seq 60); do
  if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "start.sh: the node did not become idle within 60 s; see $DIR/log/" >&2
sinfo >&2 || true
tail -n 20 "$DIR"/log/*.log >&2 || true
exit 1
