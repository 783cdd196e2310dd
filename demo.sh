#!/usr/bin/env bash
# Install what the relay needs (into .venv) and run it in demo mode: no key, no internet.
# Then open http://localhost:8000, or:
#   curl -N localhost:8000/api/stream_chat_completion -H 'Content-Type: application/json' \
#        -d '{"model":"demo","messages":[{"role":"user","content":"hi"}]}'
set -euo pipefail
cd "$(dirname "$0")"
source ./scripts/venv.sh
ensure_venv requirements.txt
RELAY_DEMO=1 exec .venv/bin/gunicorn -c gunicorn.conf.py app:app
