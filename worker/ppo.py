"""PPO against a reward model: the `ppo` job (Ziegler et al. 2019; Ouyang et al. 2022).

One step of `train_ppo`, top to bottom:
  1. take `batch_size` prompts and sample one response each from the current policy;
  2. truncate each response after its first EOS (the mask);
  3. score prompt + response text with the reward model (and the held-out one, if any);
  4. one no-grad forward pass for the policy's log-probs and values, one for the reference's;
  5. per-token reward = -kl_coef * KL_t, plus the score on the last valid token;
  6. GAE, whitened advantages;
  7. `ppo_epochs` passes over shuffled mini-batches with the clipped policy and value losses;
  8. adapt the KL coefficient, log metrics, ask the over-optimisation guard, checkpoint.
All arithmetic lives in worker/losses.py and worker/ppo_math.py; this file is the loop.

Models in memory. The value function is a linear head on the policy's last hidden state
(`PolicyWithValue`), not a separate critic: one trunk, one forward pass for log-probs and
values, half the weights, gradients and Adam state of a policy + critic pair. The
lm-human-preferences / TRL lineage trained a separate critic because value-loss gradients
can disturb a shared trunk; here `vf_coef` (0.1) keeps the value loss small next to the policy
loss, and the value head starts at zero so the first updates are pure policy gradient. The
frozen reference is, with LoRA, the same weights with the adapters switched off (no copy at
all); without LoRA, one frozen copy. So: policy (+ adapters) + value head + reference, never
four full models.

Checkpoints are `save_pretrained` directories of the policy only (the value head is a
training-time tool and is not saved: a resumed run re-learns it). With LoRA they are merged
into full models by default (`save_merged`), so every checkpoint loads and serves like any
other model; `save_merged=False` saves just the adapter, which `worker.generate.load_policy`
merges onto its base on load.
"""

from __future__ import annotations

import contextlib
import copy
import random
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

# PPOConfig lives with the params checks the web process runs without torch; re-exported.
from app.domain.job_params import PPOConfig
from worker.generate import (
    Prompt,
    decode_responses,
    encode_prompt,
    eos_mask,
    left_pad,
    pad_id_of,
    position_ids,
    render_prompt_text,
    sample_responses,
    seeded,
)
from worker.guard import OverOptimizationGuard, distinct_n, is_degenerate, repetition_ratio
from worker.losses import (
    entropy_from_logits,
    gae,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from worker.models import prepare_tokenizer, read_metadata, save_atomic
from worker.ppo_math import AdaptiveKLController, FixedKLController, per_token_rewards
from worker.reward import encode_texts

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "PPOConfig",
    "PolicyWithValue",
    "RewardFn",
    "SequenceClassifierReward",
    "train_ppo",
]

ProgressCallback = Callable[[dict[str, Any]], None]


# Reward functions ------------------------------------------------------------------------------


class RewardFn(Protocol):
    """Scores responses as text, so the reward model may use any tokenizer.

    prompts are rendered with `worker.generate.render_prompt_text`; returns (B,) floats.
    """

    def __call__(self, prompts: list[str], responses: list[str]) -> Tensor: ...


@dataclass(frozen=True)
class SequenceClassifierReward:
    """A RewardFn over a one-output sequence classifier (what `worker.reward` trains).

    Texts are re-tokenised with the reward model's own tokenizer, exactly as in reward
    training (`worker.reward.encode_texts`), and scored `batch_size` at a time.
    """

    model: PreTrainedModel
    tokenizer: Tokenizer
    max_length: int = 512
    batch_size: int = 32

    @classmethod
    def load(
        cls, model_dir: Path | str, device: str | torch.device = "cpu"
    ) -> SequenceClassifierReward:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prepare_tokenizer(tokenizer, model)
        saved = read_metadata(Path(model_dir)).get("config", {})
        max_length = int(saved.get("max_length") or min(tokenizer.model_max_length, 512))
        model.to(device).eval()
        return cls(model, tokenizer, max_length)

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> Tensor:
        device = next(self.model.parameters()).device
        ids, types = encode_texts(self.tokenizer, prompts, responses, self.max_length)
        scores = []
        for start in range(0, len(ids), self.batch_size):
            rows = ids[start : start + self.batch_size]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)  # (N, L)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (N, L)
            token_type_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (N, L)
            for i, row in enumerate(rows):
                input_ids[i, : len(row)] = torch.tensor(row)
                attention_mask[i, : len(row)] = 1
                if types is not None:
                    token_type_ids[i, : len(row)] = torch.tensor(types[start + i])
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if types is not None:
                inputs["token_type_ids"] = token_type_ids
            logits = self.model(**{k: v.to(device) for k, v in inputs.items()}).logits  # (N, 1)
            scores.append(logits[:, 0].float().cpu())
        return torch.cat(scores)  # (B,)


# Policy, value head, reference -----------------------------------------------------------------


class PolicyWithValue(nn.Module):
    """A causal LM (optionally with LoRA adapters) plus a scalar value head on its trunk."""

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm: Any = lm  # a PreTrainedModel, or a peft PeftModel wrapping one
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        # Zero init: V = 0 at first, so early advantages are the rewards themselves and no
        # random critic noise is back-propagated into the shared trunk.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, n_response: int
    ) -> tuple[Tensor, Tensor]:
        """Logits and values for the last `n_response` tokens of (B, L) sequences.

        Position t of the outputs is read at the token *before* response token t: the logits
        there are the distribution it was sampled from, the value the state it was chosen in.
        Returns logits (B, R, V) and values (B, R).
        """
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            output_hidden_states=True,
            logits_to_keep=n_response + 1,  # skip the vocabulary projection of the prompt
            use_cache=False,
        )
        logits = out.logits[:, :-1]  # (B, R, V)
        hidden = out.hidden_states[-1][:, -n_response - 1 : -1]  # (B, R, H)
        values = self.value_head(hidden.float()).squeeze(-1)  # (B, R)
        return logits, values


def reference_logits(
    policy: PolicyWithValue,
    reference: nn.Module | None,
    input_ids: Tensor,
    attention_mask: Tensor,
    n_response: int,
) -> Tensor:
    """Logits of the frozen reference for the last `n_response` tokens: (B, R, V).

    `reference=None` means LoRA: the reference is the policy's base weights with the
    adapters disabled for this one forward pass.
    """
    lm = policy.lm if reference is None else reference
    disabled = policy.lm.disable_adapter() if reference is None else contextlib.nullcontext()
    with disabled:
        out = lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            logits_to_keep=n_response + 1,
            use_cache=False,
        )
    return out.logits[:, :-1]  # (B, R, V)


def attach_lora(lm: PreTrainedModel, config: PPOConfig) -> nn.Module:
    """Wrap `lm` with LoRA adapters on every linear layer (in place; seeded init)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return get_peft_model(lm, lora)


def _disable_dropout(model: nn.Module) -> None:
    """PPO's ratio compares two forward passes of one policy; dropout would make them differ."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


# Rollouts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """One batch of sampled responses with everything the PPO update needs (all detached)."""

    sequences: Tensor  # (B, P + R) left-padded prompt + response
    attention_mask: Tensor  # (B, P + R)
    responses: Tensor  # (B, R)
    mask: Tensor  # (B, R) 1 up to and including the first EOS
    has_eos: Tensor  # (B,) bool
    logprobs: Tensor  # (B, R) under the policy at sampling time
    ref_logprobs: Tensor  # (B, R)
    values: Tensor  # (B, R)
    entropy: Tensor  # (B, R)
    scores: Tensor  # (B,) reward model
    heldout_scores: Tensor | None  # (B,) held-out reward model
    texts: list[str]  # decoded responses


class PhaseTimer:
    """Wall seconds per named phase of a step (synchronising CUDA so timings are real)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start


@torch.no_grad()
def collect_rollout(
    policy: PolicyWithValue,
    reference: nn.Module | None,
    tokenizer: Tokenizer,
    prompt_ids: list[list[int]],
    prompt_texts: list[str],
    reward_fn: RewardFn,
    heldout_reward_fn: RewardFn | None,
    config: PPOConfig,
    accelerator: Accelerator,
    *,
    seed: int,
    timer: PhaseTimer,
) -> Rollout:
    """Steps 1-4 of the module docstring for one batch of prompts."""
    device = next(policy.parameters()).device
    eos, pad = tokenizer.eos_token_id, pad_id_of(tokenizer)
    prompt_input, prompt_mask = left_pad(prompt_ids, pad)  # (B, P)
    prompt_input, prompt_mask = prompt_input.to(device), prompt_mask.to(device)

    with timer("generate"), seeded(seed, device):
        responses = sample_responses(
            policy.lm,
            prompt_input,
            prompt_mask,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            eos_token_id=eos,
            pad_token_id=pad,
        )  # (B, R)
    R = responses.shape[1]
    mask, has_eos = eos_mask(responses, eos)  # (B, R), (B,)
    sequences = torch.cat([prompt_input, responses], dim=1)  # (B, P + R)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(responses)], dim=1)  # (B, P + R)

    with timer("score"):
        texts = decode_responses(tokenizer, responses, mask, has_eos)
        scores = reward_fn(prompt_texts, texts).to(device).float()  # (B,)
        heldout = None
        if heldout_reward_fn is not None:
            heldout = heldout_reward_fn(prompt_texts, texts).to(device).float()  # (B,)

    with timer("forward"), accelerator.autocast():
        logprobs, ref_logprobs, values, entropy = [], [], [], []
        # Mini-batch sized chunks bound the (b, R, V) logits, the largest tensor here.
        for start in range(0, sequences.shape[0], config.mini_batch_size):
            chunk = slice(start, start + config.mini_batch_size)
            logits, v = policy(sequences[chunk], attention_mask[chunk], R)  # (b, R, V), (b, R)
            logits = logits.float() / config.temperature
            logprobs.append(logprobs_from_logits(logits, responses[chunk]))  # (b, R)
            entropy.append(entropy_from_logits(logits))  # (b, R)
            values.append(v)
            ref = reference_logits(policy, reference, sequences[chunk], attention_mask[chunk], R)
            ref_logprobs.append(
                logprobs_from_logits(ref.float() / config.temperature, responses[chunk])
            )

    return Rollout(
        sequences=sequences,
        attention_mask=attention_mask,
        responses=responses,
        mask=mask,
        has_eos=has_eos,
        logprobs=torch.cat(logprobs),
        ref_logprobs=torch.cat(ref_logprobs),
        values=torch.cat(values),
        entropy=torch.cat(entropy),
        scores=scores,
        heldout_scores=heldout,
        texts=texts,
    )


def ppo_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    rollout: Rollout,
    advantages: Tensor,
    returns: Tensor,
    config: PPOConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """Step 7: `ppo_epochs` passes of clipped-loss gradient steps over shuffled mini-batches.

    `model` is the (possibly accelerate-wrapped) PolicyWithValue. Returns the mean of each
    loss statistic over all gradient steps.
    """
    B, R = rollout.responses.shape
    stats: dict[str, list[Tensor]] = defaultdict(list)
    for _ in range(config.ppo_epochs):
        order = torch.randperm(B, generator=generator)  # (B,)
        for start in range(0, B, config.mini_batch_size):
            mb = order[start : start + config.mini_batch_size].to(rollout.responses.device)
            mask = rollout.mask[mb]  # (b, R)
            with accelerator.autocast():
                logits, values = model(rollout.sequences[mb], rollout.attention_mask[mb], R)
            logprobs = logprobs_from_logits(
                logits.float() / config.temperature, rollout.responses[mb]
            )  # (b, R)
            pg_loss, pg_clipfrac, approx_kl = ppo_policy_loss(
                logprobs, rollout.logprobs[mb], advantages[mb], mask, config.clip_range
            )
            vf_loss, vf_clipfrac = ppo_value_loss(
                values, rollout.values[mb], returns[mb], mask, config.clip_range_value
            )
            loss = pg_loss + config.vf_coef * vf_loss
            accelerator.backward(loss)
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for name, value in (
                ("policy_loss", pg_loss),
                ("value_loss", vf_loss),
                ("clipfrac", pg_clipfrac),
                ("value_clipfrac", vf_clipfrac),
                ("approx_kl", approx_kl),
            ):
                stats[name].append(value.detach())
    return {name: torch.stack(values).mean().item() for name, values in stats.items()}


def prompt_batches(n_prompts: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless batches of prompt indices: shuffled passes over all prompts, no repeats within
    a batch unless there are fewer prompts than `batch_size`."""
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            new_pass = list(range(n_prompts))
            rng.shuffle(new_pass)
            order.extend(new_pass)
        yield order[:batch_size]
        order = order[batch_size:]


def sample_metrics(texts: Sequence[str], rollout: Rollout) -> dict[str, float]:
    """Diversity and degeneration of one batch of responses."""
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repetition": sum(repetition_ratio(t) for t in texts) / len(texts),
        "degenerate_frac": sum(is_degenerate(t) for t in texts) / len(texts),
        "response_length": rollout.mask.sum(dim=1).float().mean().item(),
        "no_eos_frac": (~rollout.has_eos).float().mean().item(),
    }


# Training --------------------------------------------------------------------------------------


def train_ppo(
    config: PPOConfig,
    policy: PreTrainedModel,
    tokenizer: Tokenizer,
    reward_fn: RewardFn,
    prompts: Sequence[Prompt],
    *,
    heldout_reward_fn: RewardFn | None = None,
    guard: OverOptimizationGuard | None = None,
    on_progress: ProgressCallback | None = None,
    accelerator: Accelerator | None = None,
    out_dir: Path | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Optimise `policy` against `reward_fn` on `prompts` with PPO; return the run's metrics.

    `policy` is trained in place (with LoRA, adapters are injected into it). With `out_dir`,
    checkpoints go to `out_dir/step-NNNNN`: each step the guard calls best (the previous best
    is deleted when superseded) and the last step. Without a guard the last step is the best.
    `metadata` (lineage: reward model, parent policy, snapshot) is written into each
    checkpoint's prefloop.json. `on_progress` gets each step's metrics plus `total_steps`
    and `eta_s` on the main process; an exception it raises aborts the run.

    Returns {"history": [metrics per step], "best_step", "best_checkpoint",
    "last_checkpoint", "stopped_early", "stop_reason", "steps", "train_time_s", "final"}.
    """
    if not prompts:
        raise ValueError("PPO needs at least one prompt")
    accelerator = accelerator or Accelerator()
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    is_main = accelerator.is_main_process

    # Models: the policy (with LoRA adapters, or a frozen copy as the reference) + value head.
    _disable_dropout(policy)
    if config.use_lora:
        lm, reference = attach_lora(policy, config), None
    else:
        lm, reference = policy, copy.deepcopy(policy).requires_grad_(False).eval().to(device)
    model = PolicyWithValue(lm).to(device).eval()  # eval: no dropout; gradients still flow
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, eps=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped: PolicyWithValue = accelerator.unwrap_model(model)
    kl_ctl: AdaptiveKLController | FixedKLController = (
        AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)
        if config.adaptive_kl
        else FixedKLController(config.init_kl_coef)
    )

    # Prompts are tokenised once; each process takes its slice of every global batch.
    prompt_ids = [encode_prompt(tokenizer, p)[-config.max_prompt_tokens :] for p in prompts]
    prompt_texts = [render_prompt_text(p) for p in prompts]
    batches = prompt_batches(len(prompts), config.batch_size * world, random.Random(config.seed))
    generator = torch.Generator().manual_seed(config.seed)

    history: list[dict[str, Any]] = []
    best_ckpt: Path | None = None
    last_ckpt: Path | None = None
    stop_reason: str | None = None
    baseline_length: float | None = None
    start_time = time.perf_counter()
    bar = tqdm(total=config.total_steps, disable=not (is_main and sys.stderr.isatty()), desc="ppo")
    for step in range(1, config.total_steps + 1):
        step_start = time.perf_counter()
        timer = PhaseTimer(device)
        batch = next(batches)[rank::world]

        # 1-4: sample, truncate, score, forward passes.
        rollout = collect_rollout(
            unwrapped,
            reference,
            tokenizer,
            [prompt_ids[i] for i in batch],
            [prompt_texts[i] for i in batch],
            reward_fn,
            heldout_reward_fn,
            config,
            accelerator,
            seed=config.seed * 1_000_003 + step * world + rank,
            timer=timer,
        )

        # 5-6: shaped per-token rewards, GAE, whitened advantages.
        mask = rollout.mask  # (B, R)
        scores = rollout.scores  # (B,)
        if config.missing_eos_penalty is not None:
            scores = scores - config.missing_eos_penalty * (~rollout.has_eos).float()
        rewards, kl = per_token_rewards(
            scores,
            rollout.logprobs,
            rollout.ref_logprobs,
            mask,
            kl_ctl.value,
            config.kl_estimator,
        )  # (B, R), (B, R)
        if config.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae(rewards, rollout.values, mask, config.gamma, config.lam)
        advantages = masked_whiten(advantages, mask) * mask  # (B, R)

        # 7: the PPO epochs.
        with timer("update"):
            model.train()
            losses = ppo_update(
                model, optimizer, accelerator, rollout, advantages, returns, config, generator
            )
            model.eval()

        # 8: KL control, metrics, guard, checkpoint.
        metrics: dict[str, Any] = {
            "step": step,
            "reward_mean": rollout.scores.mean().item(),
            "reward_std": rollout.scores.std().item() if len(batch) > 1 else 0.0,
            "kl": kl.sum(dim=1).mean().item(),  # nats per response
            "kl_coef": kl_ctl.value,
            "non_score_reward": (-kl_ctl.value * kl).sum(dim=1).mean().item(),
            "entropy": masked_mean(rollout.entropy, mask).item(),
            **losses,
            **sample_metrics(rollout.texts, rollout),
        }
        if rollout.heldout_scores is not None:
            metrics["heldout_reward_mean"] = rollout.heldout_scores.mean().item()
        metrics = _mean_over_processes(accelerator, metrics)
        kl_ctl.update(metrics["kl"], config.batch_size * world)
        baseline_length = baseline_length or metrics["response_length"]
        metrics["length_ratio"] = metrics["response_length"] / baseline_length
        metrics["length_blowup"] = metrics["length_ratio"] >= config.length_blowup_factor

        verdict = None
        if guard is not None:
            verdict = guard.update(
                step, metrics["reward_mean"], metrics.get("heldout_reward_mean"), metrics["kl"]
            )
            metrics["best_step"] = verdict.best_step
        is_last = step == config.total_steps or (verdict is not None and verdict.stop)
        if out_dir is not None and ((verdict is not None and verdict.is_best) or is_last):
            extra = {"step": step, "config": asdict(config), "metrics": metrics, **(metadata or {})}
            with timer("save"):
                path = _save_policy(
                    accelerator, unwrapped, tokenizer, Path(out_dir), step, config, extra
                )
            if verdict is None or verdict.is_best:
                if best_ckpt is not None and is_main:
                    shutil.rmtree(best_ckpt, ignore_errors=True)  # superseded, never served
                best_ckpt = path
            last_ckpt = path

        seconds = dict(timer.seconds)
        seconds["step"] = time.perf_counter() - step_start
        metrics.update({f"time_{name}_s": value for name, value in seconds.items()})
        history.append(metrics)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.2f}")
        if on_progress is not None and is_main:
            elapsed = time.perf_counter() - start_time
            eta = elapsed / step * (config.total_steps - step)
            on_progress({**metrics, "total_steps": config.total_steps, "eta_s": eta})
        if verdict is not None and verdict.stop:
            stop_reason = verdict.reason
            break
    bar.close()

    if guard is not None and guard.best_step is not None:
        best_step = guard.best_step
    else:
        best_step = history[-1]["step"]
        best_ckpt = last_ckpt
    return {
        "history": history,
        "final": history[-1],
        "steps": len(history),
        "best_step": best_step,
        "best_checkpoint": str(best_ckpt) if best_ckpt else None,
        "last_checkpoint": str(last_ckpt) if last_ckpt else None,
        "stopped_early": stop_reason is not None,
        "stop_reason": stop_reason,
        "train_time_s": time.perf_counter() - start_time,
        "num_processes": world,
    }


def _mean_over_processes(accelerator: Accelerator, metrics: dict[str, Any]) -> dict[str, Any]:
    """Average numeric metrics across processes, so that the KL controller and the guard see
    (and decide) the same thing on every process."""
    if accelerator.num_processes == 1:
        return metrics
    names = [k for k, v in metrics.items() if isinstance(v, float) and k != "step"]
    stacked = torch.tensor([metrics[k] for k in names], device=accelerator.device)
    reduced = accelerator.reduce(stacked, reduction="mean").tolist()
    return {**metrics, **dict(zip(names, reduced, strict=True))}


def _save_policy(
    accelerator: Accelerator,
    policy: PolicyWithValue,
    tokenizer: Tokenizer,
    out_dir: Path,
    step: int,
    config: PPOConfig,
    extra: dict[str, Any],
) -> Path:
    """Save the policy (no value head) as `out_dir/step-NNNNN`; see the module docstring."""
    path = out_dir / f"step-{step:05d}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        lm = policy.lm
        if config.use_lora and config.save_merged:
            # A merged copy: merge_and_unload on the live model would end the adapters' training.
            lm = copy.deepcopy(lm).merge_and_unload()
        save_atomic(lm, tokenizer, path, {"kind": "policy", **extra})
    accelerator.wait_for_everyone()
    return path
