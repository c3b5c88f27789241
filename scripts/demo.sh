#!/usr/bin/env bash
# The main job end to end: build a map from a bag, start the relocalize node, play a
# query bag into it over DDS and report recall and latency. See `demo --help`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$((RANDOM % 90 + 1))}"
exec "${VPR_VENV:-$root/.venv}/bin/python" -m vpr_ros.cli.demo "$@"
