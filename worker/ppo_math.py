"""PPO arithmetic that worker/losses.py does not cover, kept as small pure functions.

losses.py owns GAE, whitening, the clipped losses and the KL estimators; this module holds the
two pieces of the RLHF reward shaping that sit between them (Ziegler et al. 2019): the
per-token reward built from a sequence score and a KL penalty, and the adaptive KL
coefficient. Both are tested against hand-computed numbers in tests/test_ppo_math.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from worker.losses import KLKind, kl_penalty


def per_token_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    kind: KLKind = "k1",
) -> tuple[Tensor, Tensor]:
    """r_t = -kl_coef * KL_t on every valid token, plus the sequence score on the last one.

    The reward model judges the whole response, so its score is credited to the token that
    completed it (the EOS, or the last token when the response was cut); every token pays
    for its own divergence from the reference. `mask` must be a prefix mask (1s then 0s),
    as produced by truncating at the first EOS.

    Args:
        scores: (B,) one reward-model score per response.
        logprobs, ref_logprobs: (B, T) log-probabilities of the sampled tokens under the
            policy and the frozen reference.
        mask: (B, T) 1 for valid response tokens; every row has at least one.
    Returns:
        rewards (B, T) and the per-token KL estimate (B, T), both 0 where masked.
    """
    kl = kl_penalty(logprobs, ref_logprobs, kind) * mask  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    last = mask.sum(dim=1).long() - 1  # (B,) index of the last valid token
    if (last < 0).any():
        raise ValueError("every response needs at least one valid token")
    rows = torch.arange(rewards.shape[0], device=rewards.device)  # (B,)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


class AdaptiveKLController:
    """Adjusts the KL coefficient towards a target KL (Ziegler et al. 2019, sec. 2.2).

    error = clip(KL / target - 1, -0.2, 0.2);  coef <- coef * (1 + error * n_steps / horizon)
    A KL above target raises the penalty, one below lowers it; the clip bounds how much a
    single noisy batch can move the coefficient. `n_steps` is how many samples the KL was
    measured on (the rollout batch size), so the horizon is counted in samples.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class FixedKLController:
    """A constant KL coefficient, with the same interface as the adaptive one."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass
