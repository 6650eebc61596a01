#!/usr/bin/env bash
# Set everything up (idempotent) and run the whole test suite. CI runs exactly this.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup.sh
# report.html is checked in headless Chromium (test/test_replay_visual_tokens.py): Debian's package. Without
# root or apt the test skips and says why.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[test] installing chromium (headless browser for the report.html test)"
    apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
        || echo "[test] could not install chromium: the report.html browser test will skip"
fi
# DDS stays on this machine, in a domain of this run's own.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( RANDOM % 100 + 1 ))}
echo "[test] ROS_DOMAIN_ID=$ROS_DOMAIN_ID"
exec "${ZIP_VLM_VENV:-$repo/.venv}/bin/python" -m pytest "$@"
