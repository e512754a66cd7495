#!/usr/bin/env bash
# The main job: a replayed simulated store. Starts a local mosquitto, the HQ receiver and the agent
# with a simulated inventory feed, cuts the uplink halfway, and shows HQ converge on the ground truth.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export YOLO_OFFLINE=1
exec .venv/bin/edge-agent demo "$@"
