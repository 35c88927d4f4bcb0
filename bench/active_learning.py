"""How many labels each assignment strategy needs to reach a reward-model accuracy.

A simulation with a KNOWN true preference: items are feature vectors, the true utility is
linear (u = x @ w_true), and a simulated annotator labels a pair (a, b) "a wins" with
Bradley–Terry probability sigmoid(beta * (u_a - u_b)). The reward model is a logistic
regression on feature differences (numpy, Newton steps with a small L2 penalty), retrained
after every batch of labels. Each round a strategy from `app.domain.active` orders the unlabeled
pool and the first `batch` pairs are labeled:

- random: uniform picks (`random_share=1.0`, the baseline of the same run);
- uncertainty: `uncertainty_order` on the model's predicted P(a wins);
- disagreement: `disagreement_order` on two models trained on bootstrap resamples.

Accuracy is measured on held-out pairs against the true (noiseless) preference. The target is
the mean accuracy random reaches at its full budget (plus fixed levels, `--targets`); the table
shows the labels each strategy needs (the first budget where its mean accuracy over the seeds
reaches the target) and the ratio to random's count.

    .venv/bin/python bench/active_learning.py
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.domain.active import disagreement_order, uncertainty_order  # noqa: E402
from app.domain.assignment import Candidate  # noqa: E402

STRATEGIES = ("random", "uncertainty", "disagreement")


def fit(x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 8) -> np.ndarray:
    """Logistic regression without intercept (a pair's order is symmetric) by Newton's method."""
    d = x.shape[1]
    w = np.zeros(d)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))  # (N,)
        grad = x.T @ (p - y) + l2 * w  # (d,)
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(d)  # (d, d)
        w -= np.linalg.solve(hess, grad)
    return w


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def run_one(strategy: str, seed: int, args: argparse.Namespace) -> list[float]:
    """Accuracy after each batch, for one strategy and one seed (same data for all strategies)."""
    data = np.random.default_rng(seed)
    w_true = data.normal(size=args.dim)
    items = data.normal(size=(args.items, args.dim))
    utility = items @ w_true

    def pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
        a = data.integers(0, args.items, size=n)
        b = (a + data.integers(1, args.items, size=n)) % args.items
        return a, b

    pa, pb = pairs(args.pool)
    pool_x = items[pa] - items[pb]  # (P, d)
    pool_label = (data.random(args.pool) < sigmoid(args.beta * (utility[pa] - utility[pb]))).astype(
        float
    )
    ta, tb = pairs(args.test)
    test_x = items[ta] - items[tb]
    test_truth = utility[ta] > utility[tb]

    rng = random.Random(seed * 1000 + STRATEGIES.index(strategy))
    boot = np.random.default_rng(seed + 10_000)
    labeled: list[int] = []
    unlabeled = set(range(args.pool))
    accuracy: list[float] = []
    w = np.zeros(args.dim)
    for _ in range(args.budget // args.batch):
        cands = [Candidate(task_id=i, judgment_count=0, priority=0) for i in sorted(unlabeled)]
        if strategy == "random" or not labeled:
            order = uncertainty_order(cands, {}, rng, random_share=1.0)
        elif strategy == "uncertainty":
            p = sigmoid(pool_x @ w)
            order = uncertainty_order(
                cands, {c.task_id: float(p[c.task_id]) for c in cands}, rng, args.random_share
            )
        else:
            ys = pool_label[labeled]
            xs = pool_x[labeled]
            heads = []
            for _ in range(2):
                pick = boot.integers(0, len(labeled), size=len(labeled))
                heads.append(sigmoid(pool_x @ fit(xs[pick], ys[pick])))
            order = disagreement_order(
                cands,
                {c.task_id: float(heads[0][c.task_id]) for c in cands},
                {c.task_id: float(heads[1][c.task_id]) for c in cands},
                rng,
                args.random_share,
            )
        for c in order[: args.batch]:
            labeled.append(c.task_id)
            unlabeled.discard(c.task_id)
        w = fit(pool_x[labeled], pool_label[labeled])
        accuracy.append(float(np.mean((test_x @ w > 0) == test_truth)))
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--pool", type=int, default=3000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--beta", type=float, default=3.0, help="label sharpness (noise)")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--budget", type=int, default=600)
    parser.add_argument("--random-share", type=float, default=0.2)
    parser.add_argument(
        "--targets", type=float, nargs="*", default=[0.95, 0.97], help="fixed accuracy levels"
    )
    args = parser.parse_args()

    started = time.perf_counter()
    curves = {
        s: np.mean([run_one(s, seed, args) for seed in range(args.seeds)], axis=0)
        for s in STRATEGIES
    }
    labels = np.arange(1, len(curves["random"]) + 1) * args.batch
    target = float(curves["random"][-1])
    print(
        f"{args.seeds} seeds, dim {args.dim}, {args.items} items, pool {args.pool} pairs, "
        f"beta {args.beta}, batch {args.batch}, random_share {args.random_share}; "
        f"target = random's accuracy at {args.budget} labels = {target:.3f}"
    )
    checkpoints = [i for i in range(len(labels)) if (i + 1) % max(1, len(labels) // 6) == 0]
    print("labels " + " ".join(f"{labels[i]:>6d}" for i in checkpoints))
    for s in STRATEGIES:
        print(f"{s[:6]:<6} " + " ".join(f"{curves[s][i]:6.3f}" for i in checkpoints))
    targets = [("random@budget", target)] + [(f"{t:.3f}", t) for t in args.targets]
    print(f"{'target':<14} " + " ".join(f"{s:>22}" for s in STRATEGIES))
    for name, level in targets:
        needed: dict[str, int | None] = {}
        for s in STRATEGIES:
            hit = np.nonzero(curves[s] >= level - 1e-12)[0]
            needed[s] = int(labels[hit[0]]) if len(hit) else None
        cells = []
        for s in STRATEGIES:
            n, base = needed[s], needed["random"]
            ratio = f"{n / base:.2f}x" if n is not None and base else "n/a"
            count = str(n) if n is not None else f">{args.budget}"
            cells.append(f"{count + ' labels, ' + ratio:>22}")
        print(f"{name:<14} " + " ".join(cells))
    print(f"wall time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
