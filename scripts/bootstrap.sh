#!/usr/bin/env bash
# Sets up everything edge_agent needs on a fresh Debian/Ubuntu machine: mosquitto, PostgreSQL and Chromium with
# its driver (apt, if missing), a Python >= 3.11 virtual environment in .venv, and the package with its test extras.
# Idempotent: a second run only re-installs when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pick_python() {
  for py in python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$py"; return 0
    fi
  done
  return 1
}

apt_pkgs=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then apt_pkgs+=(mosquitto); fi
# initdb and pg_ctl, for the HQ tests' private PostgreSQL cluster (simulators/postgres.py looks in the same places).
if ! command -v initdb >/dev/null 2>&1 && ! [ -x "$(pg_config --bindir 2>/dev/null)/initdb" ] \
    && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then apt_pkgs+=(postgresql); fi
# Debian's Chromium and its WebDriver, for the dashboard's browser test (tests/test_hq_dashboard_browser.py):
# Selenium drives the system browser; nothing downloads a browser of its own.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then apt_pkgs+=(chromium); fi
if ! command -v chromedriver >/dev/null 2>&1 && [ ! -x /usr/bin/chromedriver ]; then apt_pkgs+=(chromium-driver); fi
PY=$(pick_python || true)
if [ -z "$PY" ]; then apt_pkgs+=(python3 python3-venv); fi
if [ -n "$PY" ] && ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then apt_pkgs+=(python3-venv); fi
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  echo "bootstrap: installing ${apt_pkgs[*]} with apt" >&2
  sudo_ apt-get update -qq
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
  # The Debian packages may start a system-wide broker on :1883 and a cluster on :5432; the tests start their
  # own on free ports and use neither.
  PY=${PY:-$(pick_python)}
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $PY" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.edge-agent-installed
want=$(cat pyproject.toml requirements-vision.txt models/manifest.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pip_() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
  echo "bootstrap: installing edge-agent and its test extras into .venv" >&2
  pip_ --upgrade pip
  pip_ -e ".[test]"
  # Vision: torch pinned by architecture (a bare "torch" would pull a multi-GB CUDA build), then the
  # rest without their declared dependencies (see requirements-vision.txt for why).
  echo "bootstrap: installing the vision stack (torch, ultralytics, OpenVINO, ONNX Runtime, the people model)" >&2
  case "$(uname -m)" in
    aarch64|arm64) pip_ torch==2.9.1 torchvision==0.24.1 ;;
    *) pip_ torch==2.14.1 torchvision==0.29.1 ;;
  esac
  pip_ --no-deps -r requirements-vision.txt
  echo "$want" > "$stamp"
fi
# The people model: verified against the manifest and exported to OpenVINO/ONNX once (offline); again
# when the exports predate dynamic input shapes (a fixed square input would pin every camera to it).
if ! grep -q '"dynamic": true' models/cache/provisioned.json 2>/dev/null; then
  echo "bootstrap: provisioning the people model (models/provision.py)" >&2
  YOLO_OFFLINE=1 .venv/bin/python models/provision.py >&2
fi
