#!/bin/sh
# Install the Debian packages the Slurm test cluster needs (testbed/cluster.py), and Slurm's
# headers (libslurm-dev) for hpccr's SPANK plugin.
# Idempotent: exits at once when everything is already present.
set -eu

PKGS="slurm-wlm libslurm-dev munge iproute2 util-linux passwd procps"

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing="$missing $p"
    fi
done

if [ -z "$missing" ]; then
    echo "testbed: all packages present"
    exit 0
fi

echo "testbed: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update
# shellcheck disable=SC2086
apt-get install -y --no-install-recommends $missing
