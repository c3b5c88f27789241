#!/usr/bin/env bash
# The test command: set up the environment, lint, type-check, run the test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
# ROS processes stay on this machine: no multicast discovery onto the network.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$((RANDOM % 90 + 1))}"
# Fast DDS: the shipped profile (large raw frames sent best effort arrive), unless you set one.
if [[ -z "${FASTDDS_DEFAULT_PROFILES_FILE:-}" ]]; then
  export FASTDDS_DEFAULT_PROFILES_FILE="$root/config/fastdds.xml"
else
  echo "[vpr_ros] keeping your FASTDDS_DEFAULT_PROFILES_FILE=$FASTDDS_DEFAULT_PROFILES_FILE;" \
    "large raw frames sent best effort need a shared-memory segment as in config/fastdds.xml" >&2
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
