"""PPO iteration benchmark: where one step of `train_ppo` spends its time, and its memory.

SmolLM2-135M-Instruct is the policy, the packaged MiniLM-L6 the reward model (its score head
is untrained, seeded: the scores are meaningless but cost exactly what a trained head costs).
Each configuration runs in its own subprocess, so peak RSS belongs to it alone:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ppo.py                # LoRA and full fine-tuning
    HF_HUB_OFFLINE=1 .venv/bin/python bench/ppo.py --modes lora --threads 1

One iteration = `--batch` prompts, `--new-tokens` sampled tokens each, then `--ppo-epochs`
passes over mini-batches of `--mini-batch`. `train_ppo` times its own phases (generation,
scoring with the reward model, the no-grad policy/value + reference forward passes, the PPO
update) and the whole step; the overhead is the step's wall time beyond the sum of those
parts, divided by that sum: decoding, GAE, whitening, metrics, bookkeeping. The first
`--warmup` steps are run and discarded (allocator and kernel warm-up).

With LoRA the reference is the policy with its adapters disabled (no copy); with full
fine-tuning it is a frozen deep copy. `--random-init` builds both models from their configs
with random weights (same shapes, same cost; responses then rarely stop before
--new-tokens), for machines that cannot hold the packaged weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "Give me three tips for keeping a houseplant alive.",
    "Explain what a database index is in two sentences.",
    "Write a short, friendly reminder to water the garden.",
    "What should I pack for a weekend hiking trip?",
    "How do I politely decline a meeting invitation?",
    "Summarise why people enjoy cycling to work.",
    "Suggest a name for a small bakery.",
    "What is the difference between weather and climate?",
]
PARTS = ("generate", "score", "forward", "update")


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from accelerate import Accelerator
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from worker.generate import load_policy
    from worker.models import load_reward_backbone, minilm_path, prepare_tokenizer
    from worker.ppo import PPOConfig, SequenceClassifierReward, train_ppo

    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no")
    device = accelerator.device
    start = time.perf_counter()
    if args.random_init:
        policy_dir, reward_dir = (
            Path(args.random_init) / "policy",
            Path(args.random_init) / "reward",
        )
        torch.manual_seed(0)
        policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(policy_dir))
        tokenizer = AutoTokenizer.from_pretrained(policy_dir)
        reward_config = AutoConfig.from_pretrained(reward_dir, num_labels=1)
        reward_model = AutoModelForSequenceClassification.from_config(reward_config)
        reward_tokenizer = AutoTokenizer.from_pretrained(reward_dir)
        prepare_tokenizer(reward_tokenizer, reward_model)
        policy.to(device)
    else:
        policy, tokenizer = load_policy(None, Path(args.cache_dir), device=device)
        torch.manual_seed(0)  # the untrained score head
        reward_model, reward_tokenizer = load_reward_backbone(str(minilm_path()))
    reward_fn = SequenceClassifierReward(reward_model.to(device).eval(), reward_tokenizer)
    load_s = time.perf_counter() - start

    config = PPOConfig(
        batch_size=args.batch,
        mini_batch_size=args.mini_batch,
        ppo_epochs=args.ppo_epochs,
        max_new_tokens=args.new_tokens,
        total_steps=args.warmup + args.steps,
        use_lora=args.mode == "lora",
        lr=1e-4 if args.mode == "lora" else 1e-5,
        seed=0,
    )
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    start = time.perf_counter()
    result = train_ppo(config, policy, tokenizer, reward_fn, prompts, accelerator=accelerator)
    train_s = time.perf_counter() - start

    measured = result["history"][args.warmup :]
    mean = {
        name: sum(h[f"time_{name}_s"] for h in measured) / len(measured)
        for name in (*PARTS, "step")
    }
    parts = sum(mean[p] for p in PARTS)
    out = {
        "mode": args.mode,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "setup_s": train_s - sum(h["time_step_s"] for h in result["history"]),
        **{f"{name}_s": value for name, value in mean.items()},
        "parts_s": parts,
        "overhead": (mean["step"] - parts) / parts,
        "overhead_per_step": [
            (h["time_step_s"] - sum(h[f"time_{p}_s"] for p in PARTS))
            / sum(h[f"time_{p}_s"] for p in PARTS)
            for h in measured
        ],
        "response_length": sum(h["response_length"] for h in measured) / len(measured),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if device.type == "cuda":
        out["cuda_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--batch", type=int, default=4, help="prompts per iteration")
    parser.add_argument("--mini-batch", type=int, default=2)
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="measured iterations")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "prefloop-cache"))
    parser.add_argument("--random-init", default=None, help="dir with policy/ and reward/ configs")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_child(args)))
        return

    passthrough = [a for a in sys.argv[1:] if not a.startswith("--modes")]
    if "--modes" in sys.argv:  # drop the value that followed a bare --modes
        i = sys.argv.index("--modes")
        passthrough = sys.argv[1:i] + sys.argv[i + 2 :]
    results = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--child", "--mode", mode, *passthrough]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"{mode} run failed")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    print(
        f"PPO iteration: {args.batch} prompts x {args.new_tokens} new tokens, "
        f"{args.ppo_epochs} PPO epochs of mini-batches of {args.mini_batch}; "
        f"mean of {args.steps} iterations after {args.warmup} warm-up"
    )
    header = f"{'mode':<5} {'device':<6} {'thr':>3} " + " ".join(f"{p:>9}" for p in PARTS)
    print(header + f" {'parts':>8} {'step':>8} {'overhead':>9} {'peak RSS':>9}")
    for r in results:
        row = f"{r['mode']:<5} {r['device']:<6} {r['threads']:>3} "
        row += " ".join(f"{r[p + '_s']:>8.2f}s" for p in PARTS)
        row += f" {r['parts_s']:>7.2f}s {r['step_s']:>7.2f}s {r['overhead']:>8.2%}"
        row += f" {r['peak_rss_gib']:>6.2f}GiB"
        if "cuda_peak_gib" in r:
            row += f"  (GPU peak {r['cuda_peak_gib']:.2f} GiB, {r['gpu']})"
        print(row)
    for r in results:
        per_step = ", ".join(f"{o:.2%}" for o in r["overhead_per_step"])
        print(
            f"{r['mode']}: overhead per iteration {per_step}; mean response "
            f"{r['response_length']:.1f} tokens; model load {r['load_s']:.1f}s, "
            f"train_ppo setup {r['setup_s']:.1f}s (reference copy, LoRA, accelerate)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
