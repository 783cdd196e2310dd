#!/usr/bin/env bash
# Install everything the tests need (system packages and pinned Python packages) and run the
# whole suite. Extra arguments go to pytest, e.g. ./test.sh -k heartbeat
set -euo pipefail
cd "$(dirname "$0")"
source ./scripts/venv.sh
ensure_system_packages redis-server:redis-server nginx:nginx-light chromium:chromium node:nodejs npm:npm \
  systemd-analyze:systemd openssl:openssl
ensure_venv requirements-dev.txt
# The official openai npm SDK, for the passthrough test (pinned in tests/node/package-lock.json)
[ -d tests/node/node_modules/openai ] || (cd tests/node && npm ci --silent --no-audit --no-fund)
exec .venv/bin/python -m pytest "$@"
