#!/usr/bin/env bash
# Set everything up (idempotent) and run the whole test suite. CI runs exactly this.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup.sh
# DDS stays on this machine, in a domain of this run's own.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( RANDOM % 100 + 1 ))}
echo "[test] ROS_DOMAIN_ID=$ROS_DOMAIN_ID"
exec "${ZIP_VLM_VENV:-$repo/.venv}/bin/python" -m pytest "$@"
