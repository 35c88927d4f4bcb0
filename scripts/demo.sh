#!/usr/bin/env bash
# Set up Prefloop (like `make run`) and run the demo: a project from bundled prompts, the web app,
# the worker and 3 simulated annotators, one full RLHF iteration on the CPU.
# Extra arguments go to `prefloop demo` (e.g. scripts/demo.sh --reset --threads 1).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p data
exec .venv/bin/prefloop demo --simulate "${SIMULATE:-3}" "$@"
