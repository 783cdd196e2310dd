#!/usr/bin/env bash
# The benchmark of issue 7 in one command: installs what it needs when missing (nginx; the relay's
# pinned requirements in .venv; redis-server for the resumable-answer runs; openssl for
# --tls-upstream), then runs `python -m bench.run` with the given options, e.g.
#   bench/run.sh             # about 15 minutes: every scenario, 3 runs, medians
#   bench/run.sh --quick     # about 2 minutes: smaller scenarios, 1 run
# Figures and method: docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source ./scripts/venv.sh
ensure_system_packages nginx:nginx-light redis-server:redis-server openssl:openssl
ensure_venv requirements.txt
exec .venv/bin/python -m bench.run "$@"
