#!/usr/bin/env bash
# Set up and run Prefloop on its embedded default: SQLite under ./data, offline default models.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p data
.venv/bin/prefloop db upgrade
.venv/bin/prefloop user ensure-admin
.venv/bin/prefloop worker &
worker_pid=$!
trap 'kill $worker_pid 2>/dev/null || true' EXIT
echo "Prefloop: open http://127.0.0.1:${PORT:-8000}/ and log in as admin"
.venv/bin/prefloop serve --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
