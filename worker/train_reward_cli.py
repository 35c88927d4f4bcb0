"""Train a reward model from an exported `pairs` file, under `accelerate launch`.

The job queue runs training in one worker process; for several GPUs (or FSDP), export a
snapshot and launch this module on every process. The trainer is the same `train_reward`:
each process gets its shard of every batch, gradients are averaged by accelerate, metrics
are reduced across processes, and the main process alone writes the model directory.

    prefloop export PROJECT --shape pairs -o pairs.jsonl
    accelerate launch --config_file worker/accelerate/multi_gpu.yaml \\
        -m worker.train_reward_cli pairs.jsonl out/reward-1 --epochs 2 --batch-size 32

FSDP: `--config_file worker/accelerate/fsdp.yaml`. Two CPU processes (how the tests exercise
the multi-process path without GPUs):

    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m worker.train_reward_cli pairs.jsonl out

`--set NAME=VALUE` sets any other `RewardConfig` field (JSON values: `--set keep_ties=false`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from accelerate import Accelerator

from worker.reward import RewardConfig, groups_from_pairs, train_reward


def read_pairs(path: Path) -> list[dict[str, object]]:
    """Rows of a JSONL `pairs` export (chat prompts: the rendered `prompt` text is used)."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def config_from_args(args: argparse.Namespace) -> RewardConfig:
    fields = {f.name for f in dataclasses.fields(RewardConfig)}
    values: dict[str, object] = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
    }
    if args.backbone:
        values["backbone"] = args.backbone
    for item in args.set or []:
        name, _, raw = item.partition("=")
        if name not in fields:
            raise SystemExit(f"unknown RewardConfig field {name!r}; fields: {sorted(fields)}")
        try:
            values[name] = json.loads(raw)
        except json.JSONDecodeError:
            values[name] = raw
    return RewardConfig(**values)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.train_reward_cli", description=__doc__)
    parser.add_argument("pairs", type=Path, help="JSONL pairs export")
    parser.add_argument("out_dir", type=Path, help="where the save_pretrained directory goes")
    parser.add_argument("--backbone", default=None, help="default: packaged MiniLM-L6")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16, help="judgments per process")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", metavar="NAME=VALUE")
    args = parser.parse_args(argv)

    accelerator = Accelerator()
    config = config_from_args(args)
    groups = groups_from_pairs(read_pairs(args.pairs))
    metrics = train_reward(config, groups, args.out_dir, accelerator=accelerator)
    if accelerator.is_main_process:
        summary = {k: v for k, v in metrics.items() if not isinstance(v, list | dict)}
        summary["num_processes"] = accelerator.num_processes
        print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
