"""The reward trainer with two processes (torchrun, gloo on CPU): the same data-parallel code
path a multi-GPU `accelerate launch` run takes, minus the GPUs."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from worker.models import tiny_reward_model, tiny_tokenizer
from worker.reward import score

ROOT = Path(__file__).resolve().parent.parent
WORDS = [f"w{i}" for i in range(30)] + ["good", "bad"]


def _pairs(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)

    def text(marker: str) -> str:
        words = rng.choices(WORDS[:30], k=rng.randint(3, 8))
        words.insert(rng.randint(0, len(words)), marker)
        return " ".join(words)

    return [
        {
            "prompt_id": f"p{i}",
            "prompt": " ".join(rng.choices(WORDS[:30], k=3)),
            "chosen": text("good"),
            "rejected": text("bad"),
        }
        for i in range(n)
    ]


@pytest.mark.skipif(
    shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
    reason="torch's launcher is not installed",
)
def test_two_process_launch_trains_and_saves_once(tmp_path: Path) -> None:
    backbone = tmp_path / "backbone"
    tokenizer = tiny_tokenizer(WORDS)
    tiny_reward_model(len(tokenizer), seed=0).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _pairs(240, seed=1)))
    out = tmp_path / "reward"

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "ACCELERATE_USE_CPU": "true",  # without it accelerate ignores a CPU process group
    }
    # torchrun starts the two processes; Accelerator() joins their process group (gloo on CPU).
    launcher = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [
            str(launcher),
            "--nproc_per_node",
            "2",
            "-m",
            "worker.train_reward_cli",
            str(data),
            str(out),
            "--backbone",
            str(backbone),
            "--epochs",
            "3",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # only the main process reports
    assert summaries[0]["num_processes"] == 2

    assert (out / "config.json").exists()
    assert not list(tmp_path.glob("reward.tmp*"))  # atomic save left no temp directory
    fresh = _pairs(40, seed=99)
    wins = sum(
        a > b for a, b in (score(out, r["prompt"], [r["chosen"], r["rejected"]]) for r in fresh)
    )
    assert wins >= 36  # the planted rule (good beats bad) was learned across both processes
