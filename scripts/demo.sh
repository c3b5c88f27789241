#!/usr/bin/env bash
# The main job end to end: build a map from a bag, start the relocalize node, play a
# query bag into it over DDS and report recall and latency. See `demo --help`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$((RANDOM % 90 + 1))}"
# Fast DDS: the shipped profile (large raw frames sent best effort arrive), unless you set one.
if [[ -z "${FASTDDS_DEFAULT_PROFILES_FILE:-}" ]]; then
  export FASTDDS_DEFAULT_PROFILES_FILE="$root/config/fastdds.xml"
else
  echo "[vpr_ros] keeping your FASTDDS_DEFAULT_PROFILES_FILE=$FASTDDS_DEFAULT_PROFILES_FILE;" \
    "large raw frames sent best effort need a shared-memory segment as in config/fastdds.xml" >&2
fi
exec "${VPR_VENV:-$root/.venv}/bin/python" -m vpr_ros.cli.demo "$@"
