#!/usr/bin/env bash
# Install what the relay needs (into .venv) and run it in demo mode: no key, no internet.
# Then open http://localhost:8000, or:
#   curl -N localhost:8000/api/stream_chat_completion -H 'Content-Type: application/json' \
#        -d '{"model":"demo","messages":[{"role":"user","content":"hi"}]}'
set -euo pipefail
cd "$(dirname "$0")"
source ./scripts/venv.sh
ensure_venv requirements.txt
# Answers survive a dropped connection (see "Resumable answers" in the README); one worker then.
RELAY_DEMO=1 RELAY_RESUME_SECONDS="${RELAY_RESUME_SECONDS:-60}" exec .venv/bin/gunicorn -c gunicorn.conf.py app:app
