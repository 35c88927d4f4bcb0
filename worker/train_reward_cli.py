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

Margins, as in the job queue: none by default. The export's `margin` column (the strength, or
the rank distance, written for TRL's RewardTrainer) is ignored unless you pass
`--margin-column`, which applies it as TRL does. `--margin-from-strength` instead derives a
margin from the `strength` column, margin_scale * (strength - 1), as the in-app setting
`margin_from_strength` does (`--set margin_scale=1.0` to change the scale). Tied pairs
(`prefloop export --ties`) train as ties, as in the app.

`--set NAME=VALUE` sets any other `RewardConfig` field (JSON values: `--set keep_ties=false`).
OUT_DIR must not exist: checkpoints are never overwritten. The last line on stdout is a JSON
summary with the final held-out metrics under `eval` (accuracy, loss, ece, pairs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.reward import PreferenceGroup, RewardConfig

# torch, transformers and accelerate are imported inside main(), after the command line has
# been checked: a mistyped OUT_DIR fails in a second, not after loading a model.

HELD_OUT_KEYS = ("accuracy", "loss", "ece", "pairs")


def read_pairs(path: Path) -> list[dict[str, object]]:
    """Rows of a JSONL `pairs` export (chat prompts: the rendered `prompt` text is used)."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def groups_from_export(
    rows: Sequence[Mapping[str, Any]], *, margin_column: bool = False
) -> list[PreferenceGroup]:
    """PreferenceGroups from a `pairs` export, built as the in-app job builds them.

    The export writes `margin` (the strength, else the rank distance) for TRL; the job queue
    trains without margins unless `margin_from_strength` is set, so the column is dropped
    here unless `margin_column` asks for it. A row flagged `tie` is a tied pair: a tie group,
    as the app trains it (a target-0.5 pair, or dropped with keep_ties=false), never a win
    for `chosen`.
    """
    from worker.reward import groups_from_pairs

    kept = [
        row if margin_column else {k: v for k, v in row.items() if k != "margin"} for row in rows
    ]
    groups = groups_from_pairs(kept)
    return [
        dataclasses.replace(group, ranking=[[0, 1]], margin=None) if row.get("tie") else group
        for group, row in zip(groups, rows, strict=True)
    ]


def config_from_args(args: argparse.Namespace) -> RewardConfig:
    from worker.reward import RewardConfig

    fields = {f.name for f in dataclasses.fields(RewardConfig)}
    values: dict[str, object] = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
    }
    if args.backbone:
        values["backbone"] = args.backbone
    if args.margin_from_strength:
        values["margin_from_strength"] = True
    for item in args.set or []:
        name, _, raw = item.partition("=")
        if name not in fields:
            raise SystemExit(f"unknown RewardConfig field {name!r}; fields: {sorted(fields)}")
        try:
            values[name] = json.loads(raw)
        except json.JSONDecodeError:
            values[name] = raw
    return RewardConfig(**values)  # type: ignore[arg-type]


def _finite(value: Any) -> Any:
    """NaN and infinities as null, so the summary is strict JSON."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def summary(metrics: Mapping[str, Any], num_processes: int) -> dict[str, Any]:
    """The one-line JSON report: scalar metrics plus the final held-out `eval` metrics."""
    out = {k: _finite(v) for k, v in metrics.items() if not isinstance(v, list | dict)}
    held_out = metrics.get("eval") or {}
    out["eval"] = {key: _finite(held_out.get(key)) for key in HELD_OUT_KEYS}
    out["num_processes"] = num_processes
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m worker.train_reward_cli",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pairs", type=Path, help="JSONL pairs export")
    p.add_argument("out_dir", type=Path, help="where the save_pretrained directory goes (new)")
    p.add_argument("--backbone", default=None, help="default: packaged MiniLM-L6")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16, help="judgments per process")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    margins = p.add_mutually_exclusive_group()
    margins.add_argument(
        "--margin-column",
        action="store_true",
        help="use the export's `margin` column as each pair's margin, as TRL does "
        "(default: ignored, no margin, as in the app)",
    )
    margins.add_argument(
        "--margin-from-strength",
        action="store_true",
        help="margin = margin_scale * (strength - 1) from the `strength` column, as the app's "
        "margin_from_strength setting",
    )
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="any RewardConfig field")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.out_dir.exists():
        p.error(f"{args.out_dir} already exists; checkpoints are never overwritten: name a new one")
    if not args.pairs.is_file():
        p.error(f"{args.pairs} is not a file")

    from accelerate import Accelerator

    from worker.reward import train_reward

    config = config_from_args(args)
    accelerator = Accelerator()
    groups = groups_from_export(read_pairs(args.pairs), margin_column=args.margin_column)
    metrics = train_reward(config, groups, args.out_dir, accelerator=accelerator)
    if accelerator.is_main_process:
        print(json.dumps(summary(metrics, accelerator.num_processes), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
