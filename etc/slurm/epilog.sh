#!/bin/sh
# Slurm Epilog (slurm.conf: Epilog=<this file>): runs `hpccr slurm epilog` as root on each node
# of a job.  slurmd gives it no PATH; hpccr is the one of the virtualenv in the checkout this
# file belongs to (set HPCCR below for an installation elsewhere).  Always exits 0: a failing
# epilog would drain the node.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
here=$(cd "$(dirname "$0")" && pwd -P)
HPCCR="$here/../../.venv/bin/hpccr"
"$HPCCR" slurm epilog
exit 0
