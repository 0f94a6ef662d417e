#!/usr/bin/env bash
# The hpccr demo: run a real two-threaded simulation, checkpoint it mid-run (which ends it),
# show the image, restore it, and check that it finishes with the same result as a run that was
# never interrupted.  Sets everything up first (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
HPCCR=.venv/bin/hpccr
work=$(mktemp -d /tmp/hpccr-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
gcc -O2 -pthread -o "$work/heat" demo/heat.c

echo "== 1. reference run, never interrupted"
"$work/heat" > "$work/reference.log"
tail -n 2 "$work/reference.log"

echo "== 2. the same program, checkpointed mid-run"
# Only stdin/stdout/stderr open: descriptors inherited from the caller could be pipes, which this
# version cannot checkpoint yet.
setsid .venv/bin/python -c 'import os, sys; os.closerange(3, 1 << 16); os.execv(sys.argv[1], sys.argv[1:])' \
    "$work/heat" > "$work/run.log" < /dev/null 2>&1 &
pid=$!
until grep -q "step 12/" "$work/run.log" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || { cat "$work/run.log"; echo "demo: workload died" >&2; exit 1; }
    sleep 0.1
done
$HPCCR dump "$pid" -D "$work/checkpoint"
{ wait "$pid"; } 2>/dev/null || true
echo "process $pid was killed after its checkpoint; its last line:"
tail -n 1 "$work/run.log"

echo "== 3. what the image holds"
$HPCCR show "$work/checkpoint" | head -n 25

echo "== 4. restore: same pid, same threads, continues where it was"
$HPCCR restore -D "$work/checkpoint"
tail -n 3 "$work/run.log"

echo "== 5. verdict"
want=$(grep "step 40/" "$work/reference.log" | awk '{print $NF}')
got=$(grep "step 40/" "$work/run.log" | tail -n 1 | awk '{print $NF}')
if [ "$want" = "$got" ] && grep -q "^done" "$work/run.log" && grep -q "pid $pid step 40/" "$work/run.log"; then
    echo "OK: restored run finished with checksum $got (same as the reference) under pid $pid"
else
    echo "FAILED: reference $want, restored $got" >&2
    exit 1
fi
