#!/bin/bash
# The GPU check: hpccr on a real CUDA job, for a machine with an NVIDIA GPU (driver 550 or
# later) and PyTorch.  CI has no GPU; tests/test_gpu.py covers the rest through a stand-in.
#
#   bash scripts/gpu-check.sh            (as root; PYTHON=... names a Python with torch)
#
# The job (scripts/gpu_workload.py) keeps GPU_CHECK_GIB GiB (4) on the GPU and runs kernels
# on two CUDA streams all the time; at its end it checks every element against the value it
# must have ("CHECK OK").  Phases, each timed:
#   1. hpccr run --interval: a periodic checkpoint with the job left running; the job ends OK;
#      then its latest checkpoint is restored and ends OK again;
#   2. hpccr dump (the job killed) and hpccr restore; the restored job runs on;
#   3. the same image restored a second time (the first restored copy killed); it ends OK.
# Exits 0 only if every phase did.  Takes about 2-3 minutes on one H100/H200.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
TORCH_PY=${PYTHON:-python3}
HPCCR_PY=$REPO/.venv/bin/python
[ -x "$HPCCR_PY" ] || HPCCR_PY=python3
GIB=${GPU_CHECK_GIB:-4}
STEPS=${GPU_CHECK_STEPS:-1500}
W=$(mktemp -d /var/tmp/hpccr-gpu-check.XXXXXX)
PIDS=()

hpccr() { PYTHONPATH=$REPO "$HPCCR_PY" -m hpccr "$@"; }
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
say() { printf 'gpu-check: %s\n' "$*"; }
fail() { say "FAILED: $*"; for f in "$W"/*.log; do echo "--- $f"; tail -20 "$f"; done; exit 1; }
cleanup() {
    for pid in "${PIDS[@]}" $(cat "$W"/*.pid 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$W"
}
trap cleanup EXIT

# wait_for FILE PATTERN SECONDS [PID]: until a line of FILE matches (PID must stay alive).
wait_for() {
    local deadline=$((SECONDS + $3))
    until grep -q -- "$2" "$1" 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || fail "no '$2' in $1 within $3 s"
        [ -z "${4:-}" ] || kill -0 "$4" 2>/dev/null || fail "process $4 ended before '$2'"
        sleep 0.2
    done
}
count() { grep -c -- "$2" "$1" 2>/dev/null || true; }

"$HPCCR_PY" -c 'import cffi, click, pyroute2, xxhash' 2>/dev/null ||
    fail "$HPCCR_PY lacks hpccr's packages: run bash scripts/setup.sh first"
"$TORCH_PY" -c 'import torch; assert torch.cuda.is_available()' ||
    fail "$TORCH_PY has no PyTorch with CUDA (set PYTHON)"
hpccr check | grep -E '^(hpccr check|nvidia_gpu_checkpoint)' || true
hpccr check --json | "$HPCCR_PY" -c '
import json, sys
gpu = {f["name"]: f for f in json.load(sys.stdin)["features"]}["nvidia_gpu_checkpoint"]
sys.exit(gpu["status"] != "ok")' || fail "hpccr check: no usable NVIDIA checkpoint API"
JOB=("$TORCH_PY" "$REPO/scripts/gpu_workload.py" "$GIB" "$STEPS")

say "phase 1: hpccr run --interval 15s, the job left running at each checkpoint"
t=$(now)
hpccr run -D "$W/series" --interval 15s --keep 1 --pidfile "$W/run.pid" -- "${JOB[@]}" \
    >>"$W/run.log" 2>&1 &
PIDS+=($!)
wait_for "$W/run.log" READY 120 "$!"
wait_for "$W/run.log" "CHECK" 600
[ "$(count "$W/run.log" 'CHECK OK')" = 1 ] || fail "the job left running did not end OK"
[ -L "$W/series/latest" ] || fail "no periodic checkpoint was taken (the job ended first?)"
say "  job ran to its end OK in $(took "$t") s, checkpointed on the way:"
hpccr show --json "$W/series" | "$HPCCR_PY" -c '
import json, sys
image = json.load(sys.stdin)["image"]
gpu, timing = image["gpu"], image["timing"]
print(f"  checkpoint: driver checkpoint {gpu[\"checkpoint_s\"]:.2f} s, then frozen "
      f"{timing[\"frozen_s\"]:.2f} s, dump {timing[\"dump_s\"]:.2f} s in all")'
t=$(now)
hpccr restore -D "$W/series" >>"$W/run.log" 2>&1 || fail "restore of the periodic checkpoint"
[ "$(count "$W/run.log" 'CHECK OK')" = 2 ] || fail "the restored periodic checkpoint did not end OK"
say "  its latest checkpoint restored and ran to its end OK: $(took "$t") s"

say "phase 2: hpccr dump (the job killed), hpccr restore"
setsid "${JOB[@]}" >>"$W/plain.log" 2>&1 </dev/null &
job=$!
PIDS+=("$job")
wait_for "$W/plain.log" READY 120 "$job"
wait_for "$W/plain.log" "STEP 200 " 300 "$job"
t=$(now)
hpccr dump "$job" -D "$W/img" 2>&1 | sed 's/^/  /' || fail "dump"
say "  dump: $(took "$t") s"
wait "$job" && fail "the dumped job ran to its end" || true  # killed by the dump: reaped
before=$(count "$W/plain.log" STEP)
t=$(now)
hpccr restore -D "$W/img" --detach --pidfile "$W/restored.pid" >>"$W/plain.log" 2>&1 ||
    fail "restore"
say "  restore: running again after $(took "$t") s"
until [ "$(count "$W/plain.log" STEP)" -gt "$before" ]; do
    kill -0 "$(cat "$W/restored.pid")" 2>/dev/null || fail "the restored job ended"
    sleep 0.2
done
say "  the restored job computes on the GPU again: $(took "$t") s after the restore began"

say "phase 3: the same image restored a second time"
kill -9 "$(cat "$W/restored.pid")"
while kill -0 "$(cat "$W/restored.pid")" 2>/dev/null; do sleep 0.1; done
t=$(now)
hpccr restore -D "$W/img" >>"$W/plain.log" 2>&1 || fail "second restore"
[ "$(count "$W/plain.log" 'CHECK OK')" = 1 ] || fail "the job restored a second time did not end OK"
say "  restored again and ran to its end OK: $(took "$t") s"
say "all phases passed (${GIB} GiB on $("$TORCH_PY" -c 'import torch; print(torch.cuda.get_device_name(0))'))"
