"""On-demand scoring latency: the long-lived scorer process against a process per request.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/score.py [--completions 4] [--repeats 10] [--tiny]
                                                     [--threads 1]

One run measures, on the same model and request:
- one-shot: `python -m worker.score_cli MODEL_DIR` per request (how every request was served
  before `ScorerProcess`: import torch, load the model, score, exit), `--one-shot` times;
- first: the first request through a fresh `ScorerProcess` (starts the child, imports torch,
  loads the model);
- repeat: the following `--repeats` requests through the same process (model kept loaded).
Latency is wall time seen by the caller (`model_registry.score_dir`), median over the runs.

The model is the packaged MiniLM-L6 with a seeded, untrained one-output head (its scores mean
nothing, it costs what a trained reward model costs), or with `--tiny` the 2-layer test model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.services import model_registry  # noqa: E402

WORDS = [
    "the",
    "router",
    "cable",
    "restart",
    "check",
    "light",
    "modem",
    "please",
    "thanks",
    "sorry",
    "first",
    "then",
    "again",
    "settings",
    "reset",
    "power",
    "wait",
    "minute",
    "support",
    "network",
    "wifi",
    "password",
]

BUILD = """
import sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from worker.models import minilm_path, tiny_reward_model, tiny_tokenizer
out, tiny, words = sys.argv[1], sys.argv[2] == "1", sys.argv[3].split()
if tiny:
    tokenizer = tiny_tokenizer(words)
    model = tiny_reward_model(len(tokenizer), seed=0)
else:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
model.save_pretrained(out)
tokenizer.save_pretrained(out)
"""


def build_model(out: Path, tiny: bool) -> None:
    """In a child, so this process (like the web process) never imports torch."""
    subprocess.run(
        [sys.executable, "-c", BUILD, str(out), "1" if tiny else "0", " ".join(WORDS)],
        check=True,
        capture_output=True,
        cwd=str(model_registry.ROOT),
    )


def one_shot(model_dir: Path, prompt: str, completions: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "worker.score_cli", str(model_dir)],
        input=json.dumps({"prompt": prompt, "completions": completions}),
        capture_output=True,
        text=True,
        check=True,
        cwd=str(model_registry.ROOT),
    )
    return time.perf_counter() - started


def timed(
    scorer: model_registry.ScorerProcess, model_dir: Path, prompt: str, c: list[str]
) -> float:
    started = time.perf_counter()
    model_registry.score_dir(model_dir, prompt, c, scorer=scorer)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--completions", type=int, default=4)
    parser.add_argument("--words", type=int, default=60, help="words per completion")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--one-shot", type=int, default=3, help="one-shot runs (baseline)")
    parser.add_argument("--tiny", action="store_true", help="the 2-layer test model")
    parser.add_argument(
        "--threads", type=int, default=model_registry.SCORER_THREADS, help="scorer torch threads"
    )
    args = parser.parse_args()

    rng = random.Random(0)
    prompt = "My internet keeps dropping every few minutes. What should I do?"
    completions = [
        " ".join(rng.choice(WORDS) for _ in range(args.words)) for _ in range(args.completions)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "reward"
        build_model(model_dir, args.tiny)
        baseline = [one_shot(model_dir, prompt, completions) for _ in range(args.one_shot)]
        scorer = model_registry.ScorerProcess(threads=args.threads)
        try:
            first = timed(scorer, model_dir, prompt, completions)
            pid = scorer.pid
            repeat = [timed(scorer, model_dir, prompt, completions) for _ in range(args.repeats)]
            assert scorer.pid == pid, "the scorer process was restarted during the run"
        finally:
            scorer.close()

    shot, rep = statistics.median(baseline), statistics.median(repeat)
    model = "tiny (2 layers)" if args.tiny else "MiniLM-L6 reward head"
    print(
        f"model {model}; {args.completions} completions x {args.words} words; "
        f"scorer threads {args.threads}; "
        f"median of {args.one_shot} one-shot and {args.repeats} repeat requests"
    )
    print(f"{'path':<32}{'latency':>10}")
    print(f"{'one-shot process per request':<32}{shot:>9.3f}s")
    print(f"{'scorer process, first request':<32}{first:>9.3f}s")
    print(f"{'scorer process, repeat request':<32}{rep:>9.3f}s   (min {min(repeat):.3f}s)")
    print(f"one-shot / repeat: {shot / rep:.1f}x   first / repeat: {first / rep:.1f}x")


if __name__ == "__main__":
    main()
