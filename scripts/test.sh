#!/usr/bin/env bash
# Set up everything the tests need (venv, packages, Chromium, a running Postgres) and run them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# Postgres on 127.0.0.1:5432 (trust auth): start Debian's cluster if it is down.
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  if command -v pg_lsclusters >/dev/null 2>&1; then
    version=$(pg_lsclusters -h | awk 'NR==1 {print $1}')
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
  fi
fi
pg_isready -h 127.0.0.1 -p 5432 || { echo "Postgres is not reachable on 127.0.0.1:5432" >&2; exit 1; }

.venv/bin/ruff check app worker tests bench
.venv/bin/python -m pytest "$@"
