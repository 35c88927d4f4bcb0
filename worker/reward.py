"""Reward model training: preference groups in, a `save_pretrained` sequence classifier out.

One judgment is one `PreferenceGroup`: a prompt, K completions and a ranking with tie groups
(pairwise is K = 2). Each completion is scored once per step and every pair of the ranking
reads its two scores from that one forward pass; the listwise loss (worker/losses.py) then
averages pairs inside a judgment before averaging judgments, so a 4-way ranking counts as
much as a pairwise click, not six times as much.

The loop in `train_reward` is plain PyTorch under `accelerate.Accelerator`, readable top to
bottom: CPU, one GPU, or several GPUs through `accelerate launch` without code changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# RewardConfig lives with the params checks the web process runs without torch; re-exported.
from app.domain.job_params import RewardConfig
from worker.losses import listwise_ranking_loss, ranking_to_pairs, reward_centering_loss
from worker.models import (
    is_causal_tokenizer,
    load_reward_backbone,
    prepare_tokenizer,
    read_metadata,
    save_atomic,
)
from worker.stopping import Interrupted

ProgressCallback = Callable[[dict[str, Any]], None]

MAX_CURVE_POINTS = 200  # train_curve is subsampled to at most this many points
MEGABATCH_FACTOR = 50  # length grouping sorts within windows of this many batches (as HF does)
SCORE_CHUNK = 32  # completions per forward pass when scoring on demand
LOSS_SYNC_S = 0.5
"""On an accelerator the step loss is copied to the host at most this often (and at the last
step): `.item()` waits for the device, and waiting every step stops the host from preparing
the next batch while the device works. Steps in between report the last copied loss."""


@dataclass(frozen=True)
class PreferenceGroup:
    """One judgment: a ranking of completions of one prompt, best first, with tie groups.

    `prompt` is already plain text (chat prompts are rendered by the caller). `ranking` holds
    indices into `completions`, e.g. [[1], [0, 2]] = 1 beats both 0 and 2, which tie.
    `sources` says where each completion came from ("upload", "policy:3"), for per-source
    accuracy. `margin`, when set, overrides the margin derived from `strength`.
    """

    prompt_id: str
    prompt: str
    completions: list[str]
    ranking: list[list[int]]
    strength: int | None = None
    annotator: str | None = None
    sources: list[str] = field(default_factory=list)
    margin: float | None = None

    def __post_init__(self) -> None:
        if not self.completions:
            raise ValueError(f"{self.prompt_id}: a judgment needs at least one completion")
        ranked = [i for tie_group in self.ranking for i in tie_group]
        if len(set(ranked)) != len(ranked):
            raise ValueError(f"{self.prompt_id}: a completion appears twice in {self.ranking}")
        if any(not 0 <= i < len(self.completions) for i in ranked):
            raise ValueError(f"{self.prompt_id}: ranking {self.ranking} indexes past completions")
        if self.sources and len(self.sources) != len(self.completions):
            raise ValueError(f"{self.prompt_id}: one source per completion expected")
        if self.strength is not None and not 1 <= self.strength <= 3:
            raise ValueError(f"{self.prompt_id}: strength must be 1..3, got {self.strength}")


def groups_from_pairs(rows: Iterable[Mapping[str, Any]]) -> list[PreferenceGroup]:
    """PreferenceGroups from TRL-style rows {prompt, chosen, rejected, [margin, annotator,
    prompt_id, strength]}: each row is one pairwise judgment.

    Rows without `prompt_id` are keyed by a hash of the prompt text, so the held-out split
    still keeps every pair of one prompt on one side.
    """
    groups = []
    for line, row in enumerate(rows, start=1):
        chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt", "")
        if not all(isinstance(text, str) for text in (chosen, rejected, prompt)):
            raise ValueError(
                f"row {line}: conversational rows must be rendered to plain text first"
            )
        prompt_id = row.get("prompt_id") or hashlib.sha1(prompt.encode()).hexdigest()[:16]
        margin = row.get("margin")
        groups.append(
            PreferenceGroup(
                prompt_id=str(prompt_id),
                prompt=prompt,
                completions=[chosen, rejected],
                ranking=[[0], [1]],
                strength=row.get("strength"),
                annotator=row.get("annotator"),
                sources=[row.get("chosen_source", "upload"), row.get("rejected_source", "upload")],
                margin=None if margin is None else float(margin),
            )
        )
    return groups


def split_by_prompt(
    groups: list[PreferenceGroup], eval_fraction: float, seed: int
) -> tuple[list[PreferenceGroup], list[PreferenceGroup]]:
    """(train, eval) with every judgment of a prompt on the same side.

    Splitting by pair would put near-duplicates of a test prompt in training and overstate
    held-out accuracy. The prompt ids are sorted before the seeded shuffle, so the split
    depends only on the set of prompts and the seed, not on row order.
    """
    if not 0 <= eval_fraction < 1:  # a negative one would slice from the end: [:-20]
        raise ValueError(
            f"the held-out fraction must be at least 0 and below 1, not {eval_fraction}"
        )
    prompt_ids = sorted({g.prompt_id for g in groups})
    random.Random(seed).shuffle(prompt_ids)
    n_eval = round(len(prompt_ids) * eval_fraction)
    if eval_fraction > 0 and len(prompt_ids) > 1:
        n_eval = min(max(n_eval, 1), len(prompt_ids) - 1)
    held_out = set(prompt_ids[:n_eval])
    train = [g for g in groups if g.prompt_id not in held_out]
    evaluation = [g for g in groups if g.prompt_id in held_out]
    return train, evaluation


# Tokenising and batching ---------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedGroup:
    """A PreferenceGroup tokenised once, with its pairs expanded: what the collator needs."""

    input_ids: list[list[int]]  # per completion
    token_type_ids: list[list[int]] | None  # per completion; encoders with segment ids only
    pairs: list[tuple[int, int, float]]  # (better, worse, target) indices into input_ids
    margins: list[float]  # per pair; 0 for ties
    length: int  # longest completion in tokens: what padding costs
    group: PreferenceGroup


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], completions: list[str], max_length: int
) -> tuple[list[list[int]], list[list[int]] | None]:
    """Token ids for each (prompt, completion), in one batched tokenizer call.

    Encoders get a text pair ([CLS] prompt [SEP] completion [SEP]), truncating the longer side
    first. Decoders read the score at the last token, so they get prompt + completion + EOS,
    and long inputs lose the start of the prompt rather than the end of the completion.
    """
    if not is_causal_tokenizer(tokenizer):
        with_types = "token_type_ids" in tokenizer.model_input_names
        enc = tokenizer(
            prompts,
            completions,
            truncation="longest_first",
            max_length=max_length,
            return_token_type_ids=with_types,
            return_attention_mask=False,
        )
        return enc["input_ids"], enc["token_type_ids"] if with_types else None
    enc = tokenizer(
        [p + c for p, c in zip(prompts, completions, strict=True)], return_attention_mask=False
    )
    eos = tokenizer.eos_token_id
    return [ids[-(max_length - 1) :] + [eos] for ids in enc["input_ids"]], None


def pair_margin(group: PreferenceGroup, config: RewardConfig) -> float:
    """The margin of the group's strict pairs: explicit, from strength, or 0.

    Llama 2 adds a margin growing with how clearly the annotator preferred one answer, so a
    "much better" judgment demands a larger score gap than a "slightly better" one.
    """
    if group.margin is not None:
        return group.margin
    if config.margin_from_strength and group.strength is not None:
        return config.margin_scale * (group.strength - 1)
    return 0.0


def encode_groups(
    groups: list[PreferenceGroup], tokenizer: PreTrainedTokenizerBase, config: RewardConfig
) -> list[EncodedGroup]:
    """Tokenise every completion once up front: lengths are then known for length grouping,
    and epochs after the first cost no tokenisation."""
    prompts = [g.prompt for g in groups for _ in g.completions]
    texts = [c for g in groups for c in g.completions]
    all_ids, all_types = encode_texts(tokenizer, prompts, texts, config.max_length)
    encoded, start = [], 0
    for g in groups:
        end = start + len(g.completions)
        ids = all_ids[start:end]
        pairs = ranking_to_pairs(g.ranking, ties=config.keep_ties)
        margin = pair_margin(g, config)
        encoded.append(
            EncodedGroup(
                input_ids=ids,
                token_type_ids=all_types[start:end] if all_types is not None else None,
                pairs=pairs,
                margins=[margin if target == 1.0 else 0.0 for _, _, target in pairs],
                length=max(len(x) for x in ids),
                group=g,
            )
        )
        start = end
    return encoded


@dataclass(frozen=True)
class ForwardChunk:
    """Completions of similar length padded together for one forward pass."""

    input_ids: Tensor  # (n, L) right-padded to the longest row of this chunk
    attention_mask: Tensor  # (n, L)
    token_type_ids: Tensor | None  # (n, L)

    def to(self, device: torch.device) -> ForwardChunk:
        types = self.token_type_ids
        return ForwardChunk(
            _to_device(self.input_ids, device),
            _to_device(self.attention_mask, device),
            None if types is None else _to_device(types, device),
        )

    def model_inputs(self) -> dict[str, Tensor]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = self.token_type_ids
        return inputs


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A copy on `device`; to CUDA from page-locked memory, so the copy runs asynchronously
    (from pageable memory a "non-blocking" copy waits for the host side)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass(frozen=True)
class RewardBatch:
    """Flattened completions of several judgments plus the pair index tensors of the loss.

    The N completions are scored in one or more `chunks`; concatenating the chunks' scores
    and indexing with `inverse` puts them back in completion order.
    """

    chunks: list[ForwardChunk]
    inverse: Tensor  # (N,) position of completion i in the concatenated chunk outputs
    better: Tensor  # (P,) long index into the N completions
    worse: Tensor  # (P,)
    target: Tensor  # (P,) 1.0 strict, 0.5 tie
    margin: Tensor  # (P,)
    group: Tensor  # (P,) long index of the judgment, in [0, G)
    num_groups: int  # G

    def to(self, device: torch.device) -> RewardBatch:
        return RewardBatch(
            chunks=[c.to(device) for c in self.chunks],
            inverse=_to_device(self.inverse, device),
            better=_to_device(self.better, device),
            worse=_to_device(self.worse, device),
            target=_to_device(self.target, device),
            margin=_to_device(self.margin, device),
            group=_to_device(self.group, device),
            num_groups=self.num_groups,
        )

    @property
    def num_rows(self) -> int:
        return self.inverse.numel()

    @property
    def padded_tokens(self) -> int:
        return sum(c.input_ids.numel() for c in self.chunks)

    @property
    def real_tokens(self) -> int:
        return int(sum(c.attention_mask.sum() for c in self.chunks))


def split_rows(lengths: list[int], overhead_tokens: int | None) -> list[list[int]]:
    """Partition rows into forward chunks that minimise padded tokens + a cost per chunk.

    Rows are sorted longest first, so a chunk is a run of that order and costs
    rows * (its first row's length) + overhead_tokens. Exact dynamic programme over the cut
    points, O(N^2) for N rows (N is a batch: tens). A pair's two completions are often of
    very different lengths, which length grouping of whole judgments cannot fix; splitting
    the forward can. `None` means one chunk (on a GPU, padding is cheaper than a launch).
    """
    order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
    if overhead_tokens is None or len(order) <= 1:
        return [order]
    widths = [lengths[r] for r in order]
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: cheapest cost of the first j rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * widths[i] + overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks, j = [], n
    while j > 0:
        chunks.append(order[cut[j] : j])
        j = cut[j]
    return chunks[::-1]


@dataclass(frozen=True)
class PreferenceCollator:
    """Pads a list of EncodedGroups into one RewardBatch.

    Pads to the longest sequence of each forward chunk, never to max_length. With
    `split_overhead_tokens` set, the batch's completions are split into length-sorted
    chunks (see split_rows); `pad_to_multiple_of` (8 on GPUs) keeps matmul shapes friendly
    to tensor cores.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    split_overhead_tokens: int | None = None

    def _chunk(self, rows: list[list[int]], types: list[list[int]] | None) -> ForwardChunk:
        width = max(len(ids) for ids in rows)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (n, L)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (n, L)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        token_type_ids = None
        if types is not None:
            token_type_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (n, L)
            for i, t in enumerate(types):
                token_type_ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        return ForwardChunk(input_ids, attention_mask, token_type_ids)

    def __call__(self, groups: list[EncodedGroup]) -> RewardBatch:
        rows = [ids for g in groups for ids in g.input_ids]
        types = None
        if groups[0].token_type_ids is not None:
            types = [t for g in groups for t in g.token_type_ids or []]
        parts = split_rows([len(r) for r in rows], self.split_overhead_tokens)
        chunks = [
            self._chunk(
                [rows[r] for r in part], None if types is None else [types[r] for r in part]
            )
            for part in parts
        ]
        concatenated = [r for part in parts for r in part]
        inverse = torch.empty(len(rows), dtype=torch.long)
        inverse[torch.tensor(concatenated, dtype=torch.long)] = torch.arange(len(rows))

        better, worse, target, margin, group_index = [], [], [], [], []
        offset = 0
        for g_index, g in enumerate(groups):
            for (b, w, t), m in zip(g.pairs, g.margins, strict=True):
                better.append(offset + b)
                worse.append(offset + w)
                target.append(t)
                margin.append(m)
                group_index.append(g_index)
            offset += len(g.input_ids)
        return RewardBatch(
            chunks=chunks,
            inverse=inverse,
            better=torch.tensor(better, dtype=torch.long),
            worse=torch.tensor(worse, dtype=torch.long),
            target=torch.tensor(target, dtype=torch.float32),
            margin=torch.tensor(margin, dtype=torch.float32),
            group=torch.tensor(group_index, dtype=torch.long),
            num_groups=len(groups),
        )


def forward_scores(model: PreTrainedModel, batch: RewardBatch, use_bf16: bool) -> Tensor:
    """One float32 reward per completion of the batch, in completion order: (N,)."""
    device_type = batch.inverse.device.type
    outputs = []
    for chunk in batch.chunks:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_bf16):
            outputs.append(model(**chunk.model_inputs()).logits)  # (n, 1)
    return torch.cat(outputs).squeeze(-1).float()[batch.inverse]  # (N,)


def plan_batches(
    lengths: list[int], batch_size: int, length_grouped: bool, rng: random.Random
) -> list[list[int]]:
    """Indices of the items of each batch for one epoch.

    Length grouping (as HF's LengthGroupedSampler): shuffle, sort by length within windows
    of MEGABATCH_FACTOR batches, cut into batches, then shuffle the batch order, so similar
    lengths share a batch while the sequence of batches stays random.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if length_grouped:
        window = batch_size * MEGABATCH_FACTOR
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda i: -lengths[i])
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if length_grouped:
        rng.shuffle(batches)
    return batches


# Evaluation ----------------------------------------------------------------------------------


def pairwise_ece(d: Tensor, n_bins: int = 10) -> float:
    """Expected calibration error of P(better wins) = sigmoid(d) over strict pairs.

    Every pair is counted in both orientations, (sigmoid(d), 1) and (sigmoid(-d), 0): a pair
    has no natural "positive" side, and the symmetric form uses all bins of [0, 1] instead of
    only the upper half. ECE = sum_b (n_b / n) * |mean label_b - mean prob_b|.
    d: (P,) score differences better - worse.
    """
    if d.numel() == 0:
        return float("nan")
    probs = torch.cat([torch.sigmoid(d), torch.sigmoid(-d)])  # (2P,)
    labels = torch.cat([torch.ones_like(d), torch.zeros_like(d)])  # (2P,)
    bins = torch.clamp((probs * n_bins).long(), max=n_bins - 1)  # (2P,)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            gap = (labels[in_bin].mean() - probs[in_bin].mean()).abs().item()
            ece += in_bin.float().mean().item() * gap
    return ece


def _accuracy_by(keys: list[str], correct: Tensor) -> dict[str, dict[str, float]]:
    hits: dict[str, list[float]] = defaultdict(list)
    for key, ok in zip(keys, correct.tolist(), strict=True):
        hits[key].append(ok)
    return {k: {"accuracy": sum(v) / len(v), "pairs": len(v)} for k, v in sorted(hits.items())}


@torch.inference_mode()
def score_encoded(
    model: PreTrainedModel,
    encoded: list[EncodedGroup],
    collate: PreferenceCollator,
    batch_size: int,
    device: torch.device,
    use_bf16: bool,
) -> list[Tensor]:
    """Scores of every completion, one (K,) tensor per group, batched by length."""
    model.eval()
    scores: list[Tensor | None] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].length)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([encoded[i] for i in idx]).to(device)
        flat = forward_scores(model, batch, use_bf16).cpu()  # (N,)
        offset = 0
        for i in idx:
            k = len(encoded[i].input_ids)
            scores[i] = flat[offset : offset + k]
            offset += k
    return [s for s in scores if s is not None]


def evaluate(
    model: PreTrainedModel,
    encoded: list[EncodedGroup],
    collate: PreferenceCollator,
    config: RewardConfig,
    device: torch.device,
    use_bf16: bool,
) -> dict[str, Any]:
    """Held-out metrics: accuracy on strict pairs, listwise loss, ECE, and accuracy per
    annotator and per source pair (e.g. whether the model can tell policy:3 from uploads)."""
    if not encoded:
        return {}
    per_group = score_encoded(model, encoded, collate, 2 * config.batch_size, device, use_bf16)
    scores = torch.cat(per_group)  # (N,)
    better, worse, target, margin, group = [], [], [], [], []
    annotators, source_pairs = [], []
    offset = 0
    for g_index, enc in enumerate(encoded):
        g = enc.group
        for (b, w, t), m in zip(enc.pairs, enc.margins, strict=True):
            better.append(offset + b)
            worse.append(offset + w)
            target.append(t)
            margin.append(m)
            group.append(g_index)
            if t == 1.0:
                annotators.append(g.annotator or "(none)")
                pair_sources = sorted([g.sources[b], g.sources[w]]) if g.sources else ["?", "?"]
                source_pairs.append(" vs ".join(pair_sources))
        offset += len(enc.input_ids)
    better_t, worse_t = (
        torch.tensor(better, dtype=torch.long),
        torch.tensor(worse, dtype=torch.long),
    )
    target_t = torch.tensor(target, dtype=torch.float32)
    loss = listwise_ranking_loss(
        scores,
        better_t,
        worse_t,
        target_t,
        torch.tensor(margin, dtype=torch.float32),
        torch.tensor(group, dtype=torch.long),
        len(encoded),
    )
    strict = target_t == 1.0
    d = (scores[better_t] - scores[worse_t])[strict]  # (P_strict,)
    correct = (d > 0).float()
    return {
        "accuracy": correct.mean().item() if d.numel() else float("nan"),
        "loss": loss.item(),
        "ece": pairwise_ece(d),
        "pairs": int(strict.sum().item()),
        "groups": len(encoded),
        "mean_score": scores.mean().item(),
        "by_annotator": _accuracy_by(annotators, correct),
        "by_source_pair": _accuracy_by(source_pairs, correct),
    }


# Training -------------------------------------------------------------------------------------


def _use_bf16(config: RewardConfig, device: torch.device) -> bool:
    """bf16 autocast only on a CUDA device that supports it; CPU bf16 matmuls are slow."""
    if device.type != "cuda" or config.bf16 is False:
        return False
    return torch.cuda.is_bf16_supported()


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _optimizer(
    model: torch.nn.Module, config: RewardConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; biases and norm gains are not decayed.

    The fused kernel (CPU and CUDA) updates all parameters in one pass: on a CPU it takes
    about 25 ms per step for MiniLM's 22.7M parameters where the default takes about 200.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        fused=device.type in {"cpu", "cuda"},
    )


def _linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: 0 -> 1 over warmup, then linearly to 0 at total_steps."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return multiplier


RESUME_STATE = "state.pt"  # tensors: weights, optimizer, scheduler, torch RNG
RESUME_META = "resume.json"  # the rest, plain JSON


def _run_fingerprint(config: RewardConfig, groups: list[PreferenceGroup]) -> str:
    """What a resume state must match: the config and every judgment, in order."""
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    for g in groups:
        digest.update(json.dumps(asdict(g), sort_keys=True, default=str).encode())
    return digest.hexdigest()


@dataclass
class ResumeState:
    """A reward run stopped after an optimizer step, enough to continue it exactly.

    The position is (epoch, batches of its plan done); the plan is regenerated from the
    Python RNG's state at the epoch's start, so the remaining batches come in the same order
    as without the stop. Tensors go to `state.pt` (loaded with `weights_only=True`), the rest
    to `resume.json`. Each is written under a temporary name and renamed, the old JSON
    removed first and the new one renamed last, so a readable resume.json always belongs to
    the state.pt beside it. The CUDA generator is not saved: with dropout off (the default)
    nothing draws from it.
    """

    fingerprint: str
    epoch: int
    batches_done: int
    step: int
    loss: float
    history: list[dict[str, Any]]
    curve: list[tuple[int, float]]
    counts: tuple[int, int, int, int]  # pairs, completions, real tokens, padded tokens seen
    train_time: float
    train_cpu: float
    epoch_rng: Any  # random.Random.getstate() at the epoch's start
    torch_rng: Tensor
    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "torch_rng": self.torch_rng,
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
        }
        version, internal, gauss = self.epoch_rng
        meta = {
            "fingerprint": self.fingerprint,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "step": self.step,
            "loss": self.loss,
            "history": self.history,
            "curve": self.curve,
            "counts": list(self.counts),
            "train_time": self.train_time,
            "train_cpu": self.train_cpu,
            "epoch_rng": [version, list(internal), gauss],
        }
        (directory / RESUME_META).unlink(missing_ok=True)  # invalid until both are new
        tmp = directory / f"{RESUME_STATE}.tmp"
        torch.save(tensors, tmp)
        os.replace(tmp, directory / RESUME_STATE)
        tmp = directory / f"{RESUME_META}.tmp"
        tmp.write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp, directory / RESUME_META)

    @classmethod
    def load(cls, directory: Path, fingerprint: str) -> ResumeState | None:
        """The state saved in `directory` for this run, or None (none, or another run's)."""
        try:
            meta = json.loads((directory / RESUME_META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if meta.get("fingerprint") != fingerprint:
            return None
        tensors = torch.load(directory / RESUME_STATE, map_location="cpu", weights_only=True)
        version, internal, gauss = meta["epoch_rng"]
        pairs, completions, tokens, padded = meta["counts"]
        return cls(
            fingerprint=fingerprint,
            epoch=meta["epoch"],
            batches_done=meta["batches_done"],
            step=meta["step"],
            loss=meta["loss"],
            history=meta["history"],
            curve=[(int(at), float(value)) for at, value in meta["curve"]],
            counts=(pairs, completions, tokens, padded),
            train_time=meta["train_time"],
            train_cpu=meta["train_cpu"],
            epoch_rng=(version, tuple(internal), gauss),
            torch_rng=tensors["torch_rng"],
            model=tensors["model"],
            optimizer=tensors["optimizer"],
            scheduler=tensors["scheduler"],
        )


def train_reward(
    config: RewardConfig,
    groups: list[PreferenceGroup],
    out_dir: Path,
    *,
    on_progress: ProgressCallback | None = None,
    accelerator: Accelerator | None = None,
    resume_dir: Path | None = None,
) -> dict[str, Any]:
    """Train a reward model on `groups`, save it atomically to `out_dir`, return metrics.

    `on_progress` receives {step, total_steps, loss, epoch, lr, eta_s} after every optimizer
    step (main process only); an exception it raises aborts the run and no `out_dir` is
    written. The held-out split is evaluated after each epoch (`history`).

    With `resume_dir`, an `Interrupted(save=True)` raised by `on_progress` first saves the
    run's state there (weights, optimizer, scheduler, position in the epoch's batch plan,
    counters; see ResumeState), and a later call with the same config, the same groups and
    the same `resume_dir` continues from that step instead of step 0, ending with the same
    weights as an uninterrupted run. A state saved for other data or another config is
    ignored (the run starts over).
    """
    accelerator = accelerator or Accelerator()
    device = accelerator.device
    use_bf16 = _use_bf16(config, device)
    is_main = accelerator.is_main_process
    # transformers initialises the new score head (and samples dropout) from torch's global
    # generator; seeding it here is what makes two runs with one seed identical.
    torch.manual_seed(config.seed)
    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    model, tokenizer = load_reward_backbone(config.backbone, cache_dir=cache_dir)
    if config.disable_dropout:
        _disable_dropout(model)

    train_groups, eval_groups = split_by_prompt(groups, config.eval_fraction, config.seed)
    if not train_groups:
        raise ValueError("no training judgments left after the held-out split")
    train_set = encode_groups(train_groups, tokenizer, config)
    eval_set = encode_groups(eval_groups, tokenizer, config)
    # Every process takes every world_size-th batch; all take the same number so that DDP's
    # collective ops line up.
    world, rank = accelerator.num_processes, accelerator.process_index
    on_gpu = device.type == "cuda"
    collate = PreferenceCollator(
        pad_token_id=tokenizer.pad_token_id,
        pad_to_multiple_of=8 if on_gpu else None,
        # Split forwards only on a single CPU process: DDP expects one forward per backward.
        split_overhead_tokens=config.split_overhead_tokens if not on_gpu and world == 1 else None,
    )
    batches_per_epoch = math.ceil(len(train_set) / config.batch_size) // world
    if batches_per_epoch == 0:
        raise ValueError("fewer training batches than processes")
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(config.warmup_ratio * total_steps)

    model.to(device)  # before the optimizer: the fused kernel needs parameters in place
    optimizer = _optimizer(model, config, device)
    # The scheduler is stepped by hand and not passed to accelerator.prepare, which would
    # step it once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _linear_schedule(warmup_steps, total_steps)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    rng = random.Random(config.seed)
    lengths = [g.length for g in train_set]

    history: list[dict[str, Any]] = []
    curve_losses: list[tuple[int, Tensor]] = []  # copied to the host once, after training
    async_device = device.type != "cpu"
    step_loss, synced_at = float("nan"), time.perf_counter()
    curve_every = max(1, total_steps // MAX_CURVE_POINTS)
    step, pairs_seen, completions_seen, tokens_seen, padded_seen = 0, 0, 0, 0, 0
    train_time, train_cpu = 0.0, 0.0  # wall and process CPU seconds in the training loop
    first_epoch, skip_batches = 0, 0
    # Only a resumable run needs it: it serialises every judgment once.
    fingerprint = _run_fingerprint(config, groups) if resume_dir is not None else ""
    resumed = ResumeState.load(resume_dir, fingerprint) if resume_dir is not None else None
    if resumed is not None:
        accelerator.unwrap_model(model).load_state_dict(resumed.model)
        optimizer.load_state_dict(resumed.optimizer)
        scheduler.load_state_dict(resumed.scheduler)
        torch.set_rng_state(resumed.torch_rng)
        rng.setstate(resumed.epoch_rng)
        first_epoch, skip_batches = resumed.epoch, resumed.batches_done
        step, step_loss, history = resumed.step, resumed.loss, resumed.history
        curve_losses = [(at, torch.tensor(value)) for at, value in resumed.curve]
        pairs_seen, completions_seen, tokens_seen, padded_seen = resumed.counts
        train_time, train_cpu = resumed.train_time, resumed.train_cpu
    bar = tqdm(  # for direct calls in a terminal; a job reports through on_progress instead
        total=total_steps,
        initial=step,
        disable=on_progress is not None or not (is_main and sys.stderr.isatty()),
        desc="reward",
    )
    for epoch in range(first_epoch, config.epochs):
        model.train()
        epoch_rng = rng.getstate()  # what regenerates this epoch's plan on a resume
        plan = plan_batches(lengths, config.batch_size, config.length_grouped, rng)
        plan = plan[: batches_per_epoch * world][rank::world]
        epoch_start, epoch_cpu_start = time.perf_counter(), time.process_time()
        window_loss = torch.zeros((), device=device)
        for i, indices in enumerate(plan):
            if epoch == first_epoch and i < skip_batches:
                continue  # done before the resume
            window_start = (i // config.grad_accum) * config.grad_accum
            window_len = min(config.grad_accum, len(plan) - window_start)
            at_boundary = i + 1 == window_start + window_len
            cpu_batch = collate([train_set[j] for j in indices])
            pairs_seen += cpu_batch.better.numel()
            completions_seen += cpu_batch.num_rows
            padded_seen += cpu_batch.padded_tokens
            tokens_seen += cpu_batch.real_tokens
            batch = cpu_batch.to(device)
            sync = nullcontext() if at_boundary else accelerator.no_sync(model)
            with sync:
                scores = forward_scores(model, batch, use_bf16)  # (N,)
                loss = listwise_ranking_loss(
                    scores,
                    batch.better,
                    batch.worse,
                    batch.target,
                    batch.margin,
                    batch.group,
                    batch.num_groups,
                )
                if config.center_coef:
                    loss = loss + reward_centering_loss(scores, config.center_coef)
                accelerator.backward(loss / window_len)
            window_loss += loss.detach() / window_len
            if not at_boundary:
                continue

            if config.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_on_device = accelerator.reduce(window_loss, reduction="mean")
            window_loss = torch.zeros((), device=device)
            now = time.perf_counter()
            if not async_device or step == total_steps or now - synced_at >= LOSS_SYNC_S:
                step_loss, synced_at = loss_on_device.item(), now
            elapsed = train_time + now - epoch_start
            if step % curve_every == 0 or step == total_steps:
                curve_losses.append((step, loss_on_device))
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if on_progress is not None and is_main:
                try:
                    on_progress(
                        {
                            "step": step,
                            "total_steps": total_steps,
                            "loss": step_loss,
                            "epoch": epoch + (i + 1) / len(plan),
                            "lr": scheduler.get_last_lr()[0],
                            "eta_s": elapsed / step * (total_steps - step),
                        }
                    )
                except Interrupted as stop:
                    if stop.save and resume_dir is not None:
                        step_loss = loss_on_device.item()
                        ResumeState(
                            fingerprint=fingerprint,
                            epoch=epoch,
                            batches_done=i + 1,
                            step=step,
                            loss=step_loss,
                            history=history,
                            curve=[(at, float(value)) for at, value in curve_losses],
                            counts=(pairs_seen, completions_seen, tokens_seen, padded_seen),
                            train_time=train_time + time.perf_counter() - epoch_start,
                            train_cpu=train_cpu + time.process_time() - epoch_cpu_start,
                            epoch_rng=epoch_rng,
                            torch_rng=torch.get_rng_state(),
                            model=accelerator.unwrap_model(model).state_dict(),
                            optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(),
                        ).save(resume_dir)
                    raise
        train_time += time.perf_counter() - epoch_start
        train_cpu += time.process_time() - epoch_cpu_start
        metrics = evaluate(
            accelerator.unwrap_model(model), eval_set, collate, config, device, use_bf16
        )
        history.append({"epoch": epoch + 1, "step": step, **metrics})
    bar.close()
    curve = [
        {"step": at, "loss": value}
        for (at, _), value in zip(
            curve_losses,
            torch.stack([t for _, t in curve_losses]).tolist() if curve_losses else [],
            strict=True,
        )
    ]

    pairs_total = int(accelerator.reduce(torch.tensor(pairs_seen, device=device), "sum").item())
    result: dict[str, Any] = {
        "eval": history[-1] if history else {},
        "history": history,
        "train_curve": curve,
        "total_steps": total_steps,
        "train_groups": len(train_set),
        "eval_groups": len(eval_set),
        "train_time_s": train_time,
        "train_cpu_s": train_cpu,  # robust to a busy machine, unlike wall time
        "pairs_per_s": pairs_total / train_time if train_time else float("nan"),
        "completions_per_s": completions_seen * world / train_time if train_time else float("nan"),
        "train_tokens": tokens_seen * world,
        "train_padded_tokens": padded_seen * world,
        "bf16": use_bf16,
        "num_processes": world,
    }
    accelerator.wait_for_everyone()
    if is_main:
        save_atomic(
            accelerator.unwrap_model(model),
            tokenizer,
            Path(out_dir),
            {"kind": "reward", "config": asdict(config), "metrics": result},
        )
    accelerator.wait_for_everyone()
    return result


# Scoring ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardScorer:
    """A loaded reward model for on-demand scoring; build once per worker with `load`."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    device: torch.device

    @classmethod
    def load(cls, model_dir: Path | str, device: str | torch.device = "cpu") -> RewardScorer:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prepare_tokenizer(tokenizer, model)
        saved = read_metadata(Path(model_dir)).get("config", {})
        max_length = int(saved.get("max_length") or min(tokenizer.model_max_length, 512))
        model.to(device).eval()
        return cls(model, tokenizer, max_length, torch.device(device))

    def __call__(self, prompt: str, completions: list[str]) -> list[float]:
        # SCORE_CHUNK completions per forward pass bound memory for long candidate lists.
        chunks = [
            PreferenceGroup("score", prompt, list(completions[i : i + SCORE_CHUNK]), ranking=[])
            for i in range(0, len(completions), SCORE_CHUNK)
        ]
        config = RewardConfig(max_length=self.max_length)
        encoded = encode_groups(chunks, self.tokenizer, config)
        collate = PreferenceCollator(pad_token_id=self.tokenizer.pad_token_id)
        scores = score_encoded(self.model, encoded, collate, 1, self.device, use_bf16=False)
        return [s for chunk in scores for s in chunk.tolist()]


def score(model_dir: Path | str, prompt: str, completions: list[str]) -> list[float]:
    """Rewards of `completions` to `prompt` under the model saved in `model_dir` (loads it on
    every call; hold a RewardScorer to score repeatedly)."""
    return RewardScorer.load(model_dir)(prompt, completions)
