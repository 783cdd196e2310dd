#!/usr/bin/env bash
# Install everything the tests need (system packages and pinned Python packages) and run the
# whole suite. Extra arguments go to pytest, e.g. ./test.sh -k heartbeat
set -euo pipefail
cd "$(dirname "$0")"
source ./scripts/venv.sh
ensure_system_packages redis-server:redis-server nginx:nginx-light chromium:chromium
ensure_venv requirements-dev.txt
exec .venv/bin/python -m pytest "$@"
