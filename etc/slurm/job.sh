#!/bin/bash
# Put in place of a batch script submitted with --checkpoint / --checkpoint-dir by the hpccr SPANK
# plugin (plugstack.conf: job=<this file>), which passes the script's path in HPCCR_JOB_SCRIPT.
# Runs the script, with its arguments, under `hpccr slurm job`; when hpccr cannot be run here,
# runs it directly so that the job still runs.  Runs as the job's user: hpccr and its Python
# must be executable by every user.  HPCCR_BIN, if set in the job's environment, names another
# hpccr.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
HPCCR="${HPCCR_BIN:-$here/../../.venv/bin/hpccr}"
shopt -s execfail
exec "$HPCCR" slurm job -- "$HPCCR_JOB_SCRIPT" "$@"
echo "hpccr: cannot run $HPCCR; job $SLURM_JOB_ID runs without checkpoints" >&2
exec "$HPCCR_JOB_SCRIPT" "$@"
