#!/usr/bin/env bash
# Ends exactly the daemons tests/slurm/start.sh recorded in DIR/pids (TERM, then KILL after 10 s).
set -uo pipefail
D=${1:-/tmp/infomax-slurm}
[ -f "$D/pids" ] || { echo "slurm-test: no $D/pids, nothing to stop" >&2; exit 0; }
tac "$D/pids" | while read -r pid name; do kill -TERM "$pid" 2>/dev/null && echo "slurm-test: stopping $name ($pid)" >&2; done
for _ in $(seq 50); do
  alive=$(while read -r pid _; do kill -0 "$pid" 2>/dev/null && echo "$pid"; done < "$D/pids")
  [ -z "$alive" ] && break
  sleep 0.2
done
for pid in ${alive:-}; do kill -KILL "$pid" 2>/dev/null; done
rm -f "$D/pids"
