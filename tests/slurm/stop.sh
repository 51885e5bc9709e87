#!/usr/bin/env bash
# Stop the Slurm that tests/slurm/start.sh DIR started (its three daemons, by their pid files).
set -uo pipefail
DIR=${1:?usage: tests/slurm/stop.sh DIR}
for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || continue
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
done
