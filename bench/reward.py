"""Reward trainer benchmark: Prefloop's `train_reward` against TRL's `RewardTrainer`.

Same backbone, same synthetic pairs, same hyper-parameters, same machine, one run each, each
in its own subprocess (so peak RSS and CUDA peak memory belong to one trainer alone):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/reward.py --pairs 2000 --epochs 1

The planted preference (seeded, `synthetic_pairs`): every completion is 1 to 10 short neutral
filler phrases (a long-tailed count, so lengths vary as real answers do); the chosen one also
contains one phrase from POLITE, the rejected one from RUDE, at a random position.
Length carries no signal, so held-out accuracy measures whether the model learned the rule.
Both trainers get identical token ids ([CLS] prompt [SEP] completion [SEP], truncated to
--max-length); each trained model is evaluated by the same function on the same held-out
prompts.

pairs/s counts training pairs over the training loop's wall time (TRL: `train_runtime`;
ours: the loop without the per-epoch evaluation). Model loading, tokenisation, evaluation and
saving are in the end-to-end seconds reported beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FILLER = [
    "check the cable first",
    "restart it and try again",
    "read the manual for your model",
    "it depends on what you need",
    "ask a friend who has done it",
    "this usually takes a few minutes",
    "try the default settings",
    "look in the settings menu",
    "clean the parts carefully",
    "write down each step you take",
    "compare a few options",
    "keep a backup copy somewhere safe",
    "prices vary from shop to shop",
    "the simplest option is often best",
    "some versions behave differently",
    "check the logs if it fails",
]
POLITE = ["hope this helps", "happy to help", "thanks for asking", "good luck with it"]
RUDE = [
    "figure it out yourself",
    "what a dumb question",
    "stop bothering me",
    "you should know this",
]
TOPICS = ["printer", "garden", "laptop", "budget", "bicycle", "database", "oven", "resume"]
VERBS = ["fix", "set up", "clean", "plan", "choose", "update", "repair", "organise"]


def synthetic_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """n TRL-style rows {prompt_id, prompt, chosen, rejected} following the planted rule:
    chosen = filler phrases + one POLITE phrase, rejected = filler phrases + one RUDE phrase,
    1 + Exp(mean 2) filler phrases each (at most 10), drawn independently for both sides."""
    rng = random.Random(seed)

    def completion(marker_bank: list[str]) -> str:
        count = min(10, 1 + int(rng.expovariate(1 / 2.0)))
        phrases = rng.choices(FILLER, k=count)
        phrases.insert(rng.randint(0, count), rng.choice(marker_bank))
        return ". ".join(phrases) + "."

    return [
        {
            "prompt_id": f"q{i}",
            "prompt": f"How do I {rng.choice(VERBS)} my {rng.choice(TOPICS)}?",
            "chosen": completion(POLITE),
            "rejected": completion(RUDE),
        }
        for i in range(n)
    ]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def prepare(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, Any]:
    """Groups, split, tokenizer and encoded sets shared by both trainers."""
    from transformers import AutoTokenizer

    from worker.models import backbone_path
    from worker.reward import RewardConfig, encode_groups, groups_from_pairs, split_by_prompt

    config = RewardConfig(
        backbone=args.backbone,
        max_length=args.max_length,
        batch_size=args.batch_size,
        lr=args.lr,
        epochs=args.epochs,
        warmup_ratio=args.warmup_ratio,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        keep_ties=False,
        length_grouped=not args.no_length_grouping,
    )
    groups = groups_from_pairs(synthetic_pairs(args.pairs, args.seed))
    train, held_out = split_by_prompt(groups, config.eval_fraction, config.seed)
    tokenizer = AutoTokenizer.from_pretrained(backbone_path(config.backbone))
    return config, groups, encode_groups(train, tokenizer, config), held_out, tokenizer


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from worker.reward import train_reward

    config, groups, train_set, _, _ = prepare(args)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        metrics = train_reward(config, groups, Path(tmp) / "reward")
    wall = time.perf_counter() - start
    return {
        "trainer": "prefloop",
        "pairs_per_s": metrics["pairs_per_s"],
        "train_time_s": metrics["train_time_s"],
        "train_cpu_s": metrics["train_cpu_s"],
        "end_to_end_s": wall,
        "accuracy": metrics["eval"]["accuracy"],
        "eval_loss": metrics["eval"]["loss"],
        "eval_pairs": metrics["eval"]["pairs"],
        "train_pairs": len(train_set) * args.epochs,
        "train_tokens": metrics["train_tokens"],
        "padded_tokens": metrics["train_padded_tokens"],
        **memory_and_device(torch),
    }


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from trl import RewardConfig as TRLConfig
    from trl import RewardTrainer

    from worker.models import load_reward_backbone
    from worker.reward import PreferenceCollator, encode_groups, evaluate

    start = time.perf_counter()
    config, _, train_set, held_out, _ = prepare(args)
    # TRL's own text path appends tokenizer.eos_token to every completion, which MiniLM does
    # not have; pre-tokenised chosen_ids/rejected_ids (a documented TRL input) skip that and
    # give TRL exactly the token ids our trainer sees.
    dataset = Dataset.from_dict(
        {
            "chosen_ids": [g.input_ids[0] for g in train_set],
            "rejected_ids": [g.input_ids[1] for g in train_set],
        }
    )
    torch.manual_seed(config.seed)
    model, tokenizer = load_reward_backbone(config.backbone)
    with tempfile.TemporaryDirectory() as tmp:
        trl_args = TRLConfig(
            output_dir=tmp,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.lr,
            num_train_epochs=config.epochs,
            lr_scheduler_type="linear",
            warmup_steps=config.warmup_ratio,
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
            max_length=config.max_length,
            bf16=torch.cuda.is_available(),
            gradient_checkpointing=False,
            disable_dropout=True,
            logging_steps=10,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            seed=config.seed,
            dataloader_num_workers=0,
        )
        trainer = RewardTrainer(
            model=model, args=trl_args, train_dataset=dataset, processing_class=tokenizer
        )
        cpu_start = time.process_time()
        output = trainer.train()
        train_cpu = time.process_time() - cpu_start
    # Evaluate as TRL trained: no segment ids (its collator sends input_ids and mask only).
    eval_set = [
        dataclasses.replace(g, token_type_ids=None)
        for g in encode_groups(held_out, tokenizer, config)
    ]
    device = next(model.parameters()).device
    metrics = evaluate(
        model,
        eval_set,
        PreferenceCollator(tokenizer.pad_token_id),
        config,
        device,
        use_bf16=torch.cuda.is_available(),
    )
    wall = time.perf_counter() - start
    tokens = sum(len(ids) for g in train_set for ids in g.input_ids) * args.epochs
    return {
        "trainer": f"trl {trl.__version__}",
        "pairs_per_s": output.metrics["train_samples_per_second"],
        "train_time_s": output.metrics["train_runtime"],
        "train_cpu_s": train_cpu,
        "end_to_end_s": wall,
        "accuracy": metrics["accuracy"],
        "eval_loss": metrics["loss"],
        "eval_pairs": metrics["pairs"],
        "train_pairs": len(train_set) * args.epochs,
        "train_tokens": tokens,
        "padded_tokens": None,
        **memory_and_device(torch),
    }


def memory_and_device(torch: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda_max_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--backbone", default=None, help="default: packaged MiniLM-L6")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--no-length-grouping", action="store_true", help="ours, ablation")
    parser.add_argument("--only", choices=["ours", "trl"], help="run one trainer (internal)")
    parser.add_argument("--json", type=Path, help="write the --only result here (internal)")
    return parser.parse_args(argv)


def child_argv(args: argparse.Namespace, which: str, out: Path) -> list[str]:
    argv = [sys.executable, __file__, "--only", which, "--json", str(out)]
    for name, value in vars(args).items():
        if name in {"only", "json"} or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def mfu(result: dict[str, Any], params: int) -> float | None:
    """Model FLOPs utilisation: 6 * params * real (unpadded) tokens per second over the
    H100's dense bf16 peak, 989 TFLOP/s. Padding is compute spent but not counted."""
    if result["device"] == "cpu":
        return None
    flops = 6 * params * result["train_tokens"] / result["train_time_s"]
    return flops / 989e12


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if args.threads is None:
        # Other processes share this machine's cores; with more threads than idle cores,
        # torch's OpenMP workers wait for each other and training gets slower, not faster.
        idle = (os.cpu_count() or 1) - round(os.getloadavg()[0])
        args.threads = max(1, min(os.cpu_count() or 1, idle))
    torch.set_num_threads(args.threads)
    if args.only:
        result = run_ours(args) if args.only == "ours" else run_trl(args)
        result["loadavg_1m"] = os.getloadavg()[0]
        args.json.write_text(json.dumps(result))
        return

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("trl", "ours"):
            out = Path(tmp) / f"{which}.json"
            load_before = os.getloadavg()[0]
            subprocess.run(child_argv(args, which, out), check=True)
            results[which] = {**json.loads(out.read_text()), "loadavg_before": load_before}

    from worker.models import load_reward_backbone

    params = sum(p.numel() for p in load_reward_backbone(args.backbone)[0].parameters())
    ours, trl_result = results["ours"], results["trl"]
    print()
    print(
        f"pairs={args.pairs} epochs={args.epochs} batch={args.batch_size} lr={args.lr} "
        f"max_length={args.max_length} backbone={args.backbone or 'minilm'} "
        f"params={params / 1e6:.1f}M device={ours['device']} threads={ours['threads']}"
    )
    header = f"{'trainer':<12}{'pairs/s':>9}{'pairs/cpu-s':>12}{'train s':>9}{'e2e s':>8}{'acc':>7}"
    header += f"{'eval loss':>10}{'RSS MiB':>9}{'load':>6}"
    if ours["device"] != "cpu":
        header += f"{'CUDA MiB':>10}{'MFU':>7}"
    print(header)
    for r in (trl_result, ours):
        per_cpu_s = r["train_pairs"] / r["train_cpu_s"]
        line = (
            f"{r['trainer']:<12}{r['pairs_per_s']:>9.2f}{per_cpu_s:>12.2f}{r['train_time_s']:>9.1f}"
        )
        line += f"{r['end_to_end_s']:>8.1f}{r['accuracy']:>7.3f}{r['eval_loss']:>10.4f}"
        line += f"{r['peak_rss_mib']:>9.0f}{r['loadavg_before']:>6.1f}"
        if r["device"] != "cpu":
            line += f"{r['cuda_max_mem_mib']:>10.0f}{100 * (mfu(r, params) or 0):>6.2f}%"
        print(line)
    cpu_ratio = (ours["train_pairs"] / ours["train_cpu_s"]) / (
        trl_result["train_pairs"] / trl_result["train_cpu_s"]
    )
    print(
        f"ratio ours/TRL pairs/s: {ours['pairs_per_s'] / trl_result['pairs_per_s']:.2f}x wall, "
        f"{cpu_ratio:.2f}x per CPU-second  "
        f"(held-out pairs: {ours['eval_pairs']}; ours padded tokens / real tokens: "
        f"{ours['padded_tokens'] / ours['train_tokens']:.2f})"
    )


if __name__ == "__main__":
    main()
