#!/usr/bin/env bash
# The whole test suite (unit, property, integration with a real mosquitto, chaos, end to end).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export YOLO_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
