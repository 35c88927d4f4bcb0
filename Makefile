.PHONY: demo run test lint bench-reward

demo:  ## set up, then one full RLHF iteration with 3 simulated annotators (prefloop demo --simulate 3)
	scripts/demo.sh $(DEMO_ARGS)

run:   ## set up and start Prefloop on SQLite with the offline default models
	scripts/run.sh

test:  ## set up (venv, packages, Chromium, Postgres) and run the whole test suite
	scripts/test.sh

lint:
	.venv/bin/ruff check app worker tests bench
	.venv/bin/ruff format --check app worker tests bench
	.venv/bin/mypy app

bench-reward:
	HF_HUB_OFFLINE=1 .venv/bin/python bench/reward.py
