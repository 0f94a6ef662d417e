#!/bin/sh
# Slurm Prolog (slurm.conf: Prolog=<this file>): runs `hpccr slurm prolog` as root on each node
# of a job.  slurmd gives it no PATH; hpccr is the one of the virtualenv in the checkout this
# file belongs to (set HPCCR below for an installation elsewhere).  Always exits 0: a failing
# prolog would drain the node, and jobs must run even where they cannot be checkpointed.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
here=$(cd "$(dirname "$0")" && pwd -P)
HPCCR="$here/../../.venv/bin/hpccr"
"$HPCCR" slurm prolog
exit 0
