"""Pure tensor math for reward modelling and PPO.

Every function here is a small, side-effect-free map from tensors to tensors, so it can be
tested against numbers worked out by hand (tests/test_losses.py) and reused by the reward
trainer (worker/reward.py) and the PPO trainer (worker/ppo.py) without either one carrying
its own copy of the arithmetic.

Shape letters used in comments:
    N  completions in a batch (one score each)
    P  preference pairs in a batch
    G  rankings (judgments) in a batch
    B  sequences in a batch, T tokens per sequence, V vocabulary size
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

KLKind = Literal["k1", "k2", "k3", "abs"]

# Reward modelling --------------------------------------------------------------------------


def ranking_to_pairs(ranking: list[list[int]], ties: bool) -> list[tuple[int, int, float]]:
    """Expand one ranking with tie groups into (better, worse, target) pairs.

    `ranking` lists tie groups best first, e.g. `[[2], [0, 3], [1]]` means 2 > {0 = 3} > 1.
    Every item beats every item of every later group (target 1.0). With `ties=True` the items
    inside a group are also paired with target 0.5, which pulls their scores together instead
    of throwing the annotator's "these are equally good" away.
    """
    pairs: list[tuple[int, int, float]] = []
    for i, upper in enumerate(ranking):
        for lower in ranking[i + 1 :]:
            pairs.extend((better, worse, 1.0) for better in upper for worse in lower)
        if ties:
            pairs.extend(
                (upper[a], upper[b], 0.5)
                for a in range(len(upper))
                for b in range(a + 1, len(upper))
            )
    return pairs


def listwise_ranking_loss(
    scores: Tensor,
    better: Tensor,
    worse: Tensor,
    target: Tensor,
    margin: Tensor,
    group: Tensor,
    num_groups: int,
) -> Tensor:
    """InstructGPT's listwise Bradley–Terry loss, one score per completion.

    A K-way ranking yields C(K, 2) pairs; averaging pairs inside their ranking first and then
    over rankings makes each judgment weigh the same whatever its K (InstructGPT, sec. 3.5),
    and scoring each completion once lets all its pairs share one forward pass.

    Per pair, with d = s_better - s_worse - m:
        -(t * logsigmoid(d) + (1 - t) * logsigmoid(-d))
    t = 1 is a strict preference (plain Bradley–Terry with margin m, as in Llama 2);
    t = 0.5 is a tie, whose loss is smallest when the two scores are equal. The margin only
    applies to strict pairs: a tie has no direction to shift.

    Args:
        scores: (N,) one reward per completion.
        better, worse: (P,) long indices into `scores`.
        target: (P,) 1.0 strict, 0.5 tie.
        margin: (P,) subtracted from the difference of strict pairs (0 when unused).
        group: (P,) long index of the ranking each pair came from, in [0, num_groups).
        num_groups: G; rankings without any pair (all tied, ties dropped) are left out.
    Returns:
        () mean over rankings of the mean pair loss within each ranking.
    """
    if better.numel() == 0:
        return scores.sum() * 0.0  # a batch of all-tied rankings: zero loss, graph kept
    strict = target == 1.0  # (P,)
    d = scores[better] - scores[worse] - torch.where(strict, margin, torch.zeros_like(margin))
    per_pair = -(target * F.logsigmoid(d) + (1.0 - target) * F.logsigmoid(-d))  # (P,)
    zeros = scores.new_zeros(num_groups)  # (G,)
    loss_sum = zeros.index_add(0, group, per_pair)  # (G,)
    count = zeros.index_add(0, group, torch.ones_like(per_pair))  # (G,)
    has_pairs = count > 0  # (G,)
    return (loss_sum[has_pairs] / count[has_pairs]).mean()


def reward_centering_loss(scores: Tensor, coef: float) -> Tensor:
    """coef * mean(scores**2): the Bradley–Terry loss only sees differences, so the reward's
    offset drifts freely; this auxiliary term (Eisenstein et al. 2023, TRL's
    `center_rewards_coefficient`) pins it near zero, which PPO's KL-balanced reward needs.

    scores: (N,) -> ()
    """
    return coef * scores.pow(2).mean()


# Masked statistics -------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over positions where `mask` is 1 (padding excluded).

    x, mask: same shape; dim=None reduces everything to (), otherwise along `dim`.
    """
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over the masked positions, Bessel-corrected by default (TRL semantics).

    x, mask: same shape -> ()
    """
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count <= 1:
            raise ValueError(
                f"masked_var needs at least two unmasked values for an unbiased estimate, "
                f"got {int(count.item())}"
            )
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise `x` to unit variance (and zero mean) using only the unmasked positions.

    With shift_mean=False the original mean is kept, as TRL does for rewards, so that the
    sign of the signal survives while its scale is normalised.
    x, mask: same shape -> same shape (padding positions are transformed too; mask them later).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# PPO ----------------------------------------------------------------------------------------


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016).

    delta_t = r_t + gamma * V_{t+1} - V_t ;  A_t = delta_t + gamma * lam * A_{t+1}
    The value after the last valid token is 0 (the episode ends there), so the trailing
    padding must be masked: masked positions contribute neither values nor rewards, and the
    recursion restarts at them.

    Args:
        rewards, values: (B, T) per-token reward and value estimate.
        mask: (B, T) 1 for valid response tokens, 0 for trailing padding.
    Returns:
        advantages (B, T), returns = advantages + values (B, T); both 0 where masked.
    """
    mask = mask.to(values.dtype)
    values = values * mask  # (B, T)
    rewards = rewards * mask  # (B, T)
    T = values.shape[1]
    advantages = torch.zeros_like(values)  # (B, T)
    next_advantage = values.new_zeros(values.shape[0])  # (B,)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(next_advantage)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]  # (B,)
        advantages[:, t] = next_advantage
    returns = (advantages + values) * mask  # (B, T)
    return advantages, returns


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate objective, as a loss to minimise.

    loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))) over valid tokens.
    Taking the max of the two losses is the pessimistic bound: the policy gets no credit for
    moving the ratio beyond the trust region in the direction the advantage rewards.

    Args:
        logprobs, old_logprobs, advantages, mask: (B, T).
    Returns:
        loss (), clipfrac () fraction of tokens where the clipped term was the active one,
        approx_kl () = 0.5 * mean((logp - logp_old)^2), the k2 estimator TRL logs.
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    approx_kl = 0.5 * masked_mean(log_ratio.pow(2), mask)
    return loss, clipfrac, approx_kl


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float
) -> tuple[Tensor, Tensor]:
    """Clipped value loss: 0.5 * mean(max((V - R)^2, (V_clip - R)^2)) over valid tokens.

    V_clip keeps the new value within clip_range_value of the value at rollout time, so one
    noisy batch of returns cannot drag the critic far (PPO2 / TRL).

    Args:
        values, old_values, returns, mask: (B, T).
    Returns:
        loss (), clipfrac () fraction of tokens where the clipped error was the larger.
    """
    clipped_values = old_values + torch.clamp(
        values - old_values, -clip_range_value, clip_range_value
    )  # (B, T)
    unclipped_error = (values - returns).pow(2)  # (B, T)
    clipped_error = (clipped_values - returns).pow(2)  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    clipfrac = masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)
    return loss, clipfrac


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: KLKind) -> Tensor:
    """Per-token estimators of KL(policy || reference) from sampled tokens (Schulman, 2020,
    "Approximating KL divergence").

    With log r = logq - logp (q: reference, p: policy, token sampled from p):
        k1  = logp - logq               unbiased, high variance, can be negative
        k2  = 0.5 * (logp - logq)^2     biased, low variance, always >= 0
        k3  = exp(log r) - 1 - log r    unbiased, low variance, always >= 0
        abs = |logp - logq|
    logprobs, ref_logprobs: (B, T) -> (B, T)
    """
    diff = logprobs - ref_logprobs  # (B, T) logp - logq
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff.pow(2)
    if kind == "k3":
        log_r = -diff
        return torch.exp(log_r) - 1.0 - log_r
    if kind == "abs":
        return diff.abs()
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of k1, k2, k3, abs")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax distribution at each position.

    H = logsumexp(z) - sum(softmax(z) * z), which avoids taking log of tiny probabilities.
    logits: (B, T, V) -> (B, T)
    """
    probs = torch.softmax(logits, dim=-1)  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] at each position without materialising the full
    (B, T, V) log-softmax: gather the label's logit and subtract logsumexp.

    Half-precision logits are upcast one sequence at a time, because logsumexp over a large
    vocabulary in bf16 loses most of its precision, and upcasting the whole batch at once
    doubles peak memory for the largest tensor in PPO.
    logits: (B, T, V), labels: (B, T) long -> (B, T) float
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
        return picked - torch.logsumexp(logits, dim=-1)
    rows = []
    for row_logits, row_labels in zip(logits, labels, strict=True):  # (T, V), (T,)
        row_logprobs = F.log_softmax(row_logits.float(), dim=-1)  # (T, V)
        rows.append(row_logprobs.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)  # (B, T)
