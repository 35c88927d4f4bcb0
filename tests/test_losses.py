"""worker/losses.py against numbers worked out by hand.

softplus(x) = log(1 + e^x) and -logsigmoid(d) = softplus(-d) appear throughout:
    softplus(-2)   = log(1 + 0.13533528) = 0.12692801
    softplus(-1)   = log(1 + 0.36787944) = 0.31326169
    softplus(-0.5) = log(1 + 0.60653066) = 0.47407698
    softplus(0)    = log 2               = 0.69314718
    softplus(1)    = log(1 + 2.71828183) = 1.31326169
"""

from __future__ import annotations

import math

import pytest
import torch

from worker.losses import (
    entropy_from_logits,
    gae,
    kl_penalty,
    listwise_ranking_loss,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    ranking_to_pairs,
    reward_centering_loss,
)

T = torch.tensor


def close(actual: torch.Tensor, expected: float | list, atol: float = 1e-6) -> None:
    torch.testing.assert_close(
        actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0
    )


# ranking_to_pairs ---------------------------------------------------------------------------


def test_ranking_to_pairs_strict_and_ties() -> None:
    # 2 > {0 = 3} > 1
    ranking = [[2], [0, 3], [1]]
    strict = [(2, 0, 1.0), (2, 3, 1.0), (2, 1, 1.0), (0, 1, 1.0), (3, 1, 1.0)]
    assert ranking_to_pairs(ranking, ties=False) == strict
    assert ranking_to_pairs(ranking, ties=True) == strict + [(0, 3, 0.5)]


def test_ranking_to_pairs_pairwise_and_all_tied() -> None:
    assert ranking_to_pairs([[1], [0]], ties=True) == [(1, 0, 1.0)]
    assert ranking_to_pairs([[0, 1]], ties=False) == []
    assert ranking_to_pairs([[0, 1]], ties=True) == [(0, 1, 0.5)]


# listwise_ranking_loss ----------------------------------------------------------------------

# Completions 0, 1, 2 form a 3-way ranking 0 > 1 > 2 (group 0);
# completions 3, 4 form one pairwise judgment 3 > 4 (group 1) that the model gets wrong.
SCORES = T([2.0, 1.0, 0.0, 0.5, 1.5])
BETTER = T([0, 0, 1, 3])
WORSE = T([1, 2, 2, 4])
#   d = [2-1, 2-0, 1-0, 0.5-1.5] = [1, 2, 1, -1]
#   per pair: softplus(-d) = [0.31326169, 0.12692801, 0.31326169, 1.31326169]


def test_listwise_weighs_each_ranking_equally() -> None:
    loss = listwise_ranking_loss(
        SCORES, BETTER, WORSE, T([1.0] * 4), torch.zeros(4), T([0, 0, 0, 1]), num_groups=2
    )
    # group 0: (0.31326169 + 0.12692801 + 0.31326169) / 3 = 0.25115046
    # group 1: 1.31326169
    # mean over groups: (0.25115046 + 1.31326169) / 2 = 0.78220608
    close(loss, 0.78220608)


def test_listwise_without_grouping_is_a_different_number() -> None:
    ungrouped = listwise_ranking_loss(
        SCORES, BETTER, WORSE, T([1.0] * 4), torch.zeros(4), T([0, 0, 0, 0]), num_groups=1
    )
    # plain mean over the 4 pairs: (0.75345139 + 1.31326169) / 4 = 0.51667827, so the 3-way
    # ranking would count three times as much as the pairwise judgment.
    close(ungrouped, 0.51667827)
    assert abs(ungrouped.item() - 0.78220608) > 0.2


def test_listwise_ignores_groups_without_pairs() -> None:
    # Same pairs, but num_groups=3 where group 2 (say, an all-tied ranking with ties dropped)
    # has no pair: it must not pull the mean towards zero.
    loss = listwise_ranking_loss(
        SCORES, BETTER, WORSE, T([1.0] * 4), torch.zeros(4), T([0, 0, 0, 1]), num_groups=3
    )
    close(loss, 0.78220608)


def test_listwise_pairwise_is_bradley_terry() -> None:
    chosen, rejected = T([1.0, 0.0]), T([0.0, 2.0])
    scores = torch.cat([chosen, rejected])  # (4,)
    loss = listwise_ranking_loss(
        scores, T([0, 1]), T([2, 3]), T([1.0, 1.0]), torch.zeros(2), T([0, 1]), num_groups=2
    )
    # d = [1, -2]: (softplus(-1) + softplus(2)) / 2 = (0.31326169 + 2.12692801) / 2
    close(loss, (0.31326169 + 2.12692801) / 2)
    close(loss, -torch.nn.functional.logsigmoid(chosen - rejected).mean())


def test_listwise_tie_target_half() -> None:
    scores = T([1.0, 1.0, 2.0, 1.0])
    # pair (0, 1): d = 0 -> 0.5 * (softplus(0) + softplus(0)) = log 2 = 0.69314718
    # pair (2, 3): d = 1 -> 0.5 * (softplus(-1) + softplus(1)) = 0.5 * 1.62652338 = 0.81326169
    loss = listwise_ranking_loss(
        scores, T([0, 2]), T([1, 3]), T([0.5, 0.5]), torch.zeros(2), T([0, 1]), num_groups=2
    )
    close(loss, (0.69314718 + 0.81326169) / 2)
    # A tie is symmetric: swapping better and worse gives the same loss.
    swapped = listwise_ranking_loss(
        scores, T([1, 3]), T([0, 2]), T([0.5, 0.5]), torch.zeros(2), T([0, 1]), num_groups=2
    )
    close(swapped, loss.item())


def test_listwise_margin_applies_to_strict_pairs_only() -> None:
    scores = T([1.0, 0.0, 1.0, 0.0])
    # strict pair d = 1 - 0.5 = 0.5 -> softplus(-0.5) = 0.47407698
    # tie pair d = 1, its margin 0.5 is ignored -> 0.81326169
    loss = listwise_ranking_loss(
        scores, T([0, 2]), T([1, 3]), T([1.0, 0.5]), T([0.5, 0.5]), T([0, 1]), num_groups=2
    )
    close(loss, (0.47407698 + 0.81326169) / 2)


def test_listwise_gradient_pushes_better_up() -> None:
    scores = T([0.0, 0.0], requires_grad=True)
    loss = listwise_ranking_loss(scores, T([0]), T([1]), T([1.0]), T([0.0]), T([0]), 1)
    loss.backward()
    # d/ds_better softplus(-(s_b - s_w)) = -sigmoid(-d) = -0.5 at d = 0
    close(scores.grad, [-0.5, 0.5])


def test_listwise_no_pairs_is_zero_with_graph() -> None:
    scores = T([1.0, 2.0], requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    loss = listwise_ranking_loss(scores, empty, empty, torch.zeros(0), torch.zeros(0), empty, 1)
    assert loss.item() == 0.0
    loss.backward()  # must not raise
    close(scores.grad, [0.0, 0.0])


def test_reward_centering_loss() -> None:
    # 0.1 * (1 + 4 + 9) / 3 = 0.46666667
    close(reward_centering_loss(T([1.0, -2.0, 3.0]), coef=0.1), 0.46666667)


# masked statistics --------------------------------------------------------------------------

X = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # valid values: 1, 2, 4


def test_masked_mean() -> None:
    close(masked_mean(X, MASK), 7.0 / 3.0)  # (1 + 2 + 4) / 3
    close(masked_mean(X, MASK, dim=1), [1.5, 4.0])  # (1 + 2) / 2, 4 / 1


def test_masked_var() -> None:
    # deviations from 7/3: -4/3, -1/3, 5/3; squares sum to (16 + 1 + 25) / 9 = 14/3
    close(masked_var(X, MASK, unbiased=False), 14.0 / 9.0)  # / 3
    close(masked_var(X, MASK, unbiased=True), 7.0 / 3.0)  # / (3 - 1)
    with pytest.raises(ValueError):
        masked_var(X, T([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_masked_whiten() -> None:
    # (x - 7/3) / sqrt(7/3), sqrt(7/3) = 1.52752523
    w = masked_whiten(X, MASK)
    close(w[MASK.bool()], [-0.87287156, -0.21821789, 1.09108945])
    close(masked_mean(w, MASK), 0.0)
    close(masked_var(w, MASK), 1.0, atol=1e-5)
    # shift_mean=False adds the mean back: the scale changes, the location stays.
    kept = masked_whiten(X, MASK, shift_mean=False)
    close(kept[MASK.bool()], [1.46046177, 2.11511544, 3.42442278])


# gae ----------------------------------------------------------------------------------------


def test_gae_hand_computed_with_masked_tail() -> None:
    gamma, lam = 0.9, 0.5  # gamma * lam = 0.45
    rewards = T([[1.0, 0.0, 2.0], [0.0, 0.0, 1.0]])
    values = T([[0.5, 1.0, 3.0], [0.2, 0.4, 0.6]])
    mask = T([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    # Row 0, position 2 is padding: its reward 2.0 and value 3.0 must be ignored.
    #   t=1: delta = 0 + 0.9 * 0 (bootstrap 0 after the last token) - 1.0 = -1.0; A = -1.0
    #   t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4; A = 1.4 + 0.45 * -1.0 = 0.95
    #   returns = A + V = [1.45, 0.0, 0]
    # Row 1, no padding:
    #   t=2: delta = 1 + 0 - 0.6 = 0.4; A = 0.4
    #   t=1: delta = 0 + 0.9 * 0.6 - 0.4 = 0.14; A = 0.14 + 0.45 * 0.4 = 0.32
    #   t=0: delta = 0 + 0.9 * 0.4 - 0.2 = 0.16; A = 0.16 + 0.45 * 0.32 = 0.304
    #   returns = [0.504, 0.72, 1.0]
    close(advantages, [[0.95, -1.0, 0.0], [0.304, 0.32, 0.4]])
    close(returns, [[1.45, 0.0, 0.0], [0.504, 0.72, 1.0]])


def test_gae_lambda_one_gamma_one_is_return_to_go_minus_value() -> None:
    rewards, values, mask = T([[1.0, 2.0, 3.0]]), T([[0.5, 0.5, 0.5]]), T([[1.0, 1.0, 1.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(returns, [[6.0, 5.0, 3.0]])  # Monte Carlo return-to-go
    close(advantages, [[5.5, 4.5, 2.5]])


# ppo losses ---------------------------------------------------------------------------------

LOGP = T([[-1.0, -0.5, -2.0]])
OLD_LOGP = T([[-1.0, -1.0, -1.0]])
ADV = T([[1.0, 2.0, -1.0]])
# ratio = exp(logp - old) = [1, e^0.5 = 1.64872127, e^-1 = 0.36787944], clip range 0.2
#   t0: -A*r = -1,          -A*clip(r) = -1          -> -1    (not clipped)
#   t1: -A*r = -3.29744254, -A*clip(r) = -2 * 1.2 = -2.4 -> -2.4  (clipped)
#   t2: -A*r = 0.36787944,  -A*clip(r) = 1 * 0.8 = 0.8   -> 0.8   (clipped)


def test_ppo_policy_loss_masked_tail() -> None:
    loss, clipfrac, approx_kl = ppo_policy_loss(LOGP, OLD_LOGP, ADV, T([[1.0, 1.0, 0.0]]), 0.2)
    close(loss, (-1.0 - 2.4) / 2)  # -1.7
    close(clipfrac, 0.5)  # one of the two valid tokens clipped
    close(approx_kl, 0.5 * (0.0 + 0.25) / 2)  # 0.0625


def test_ppo_policy_loss_all_tokens() -> None:
    loss, clipfrac, approx_kl = ppo_policy_loss(LOGP, OLD_LOGP, ADV, torch.ones(1, 3), 0.2)
    close(loss, (-1.0 - 2.4 + 0.8) / 3)  # -0.86666667
    close(clipfrac, 2.0 / 3.0)
    close(approx_kl, 0.5 * (0.0 + 0.25 + 1.0) / 3)  # 0.20833333


def test_ppo_policy_loss_inside_trust_region_is_plain_surrogate() -> None:
    logp, old, adv = T([[-0.9]]), T([[-1.0]]), T([[2.0]])
    # r = e^0.1 = 1.10517092 < 1.2: loss = -2 * 1.10517092
    loss, clipfrac, _ = ppo_policy_loss(logp, old, adv, torch.ones(1, 1), 0.2)
    close(loss, -2.21034184)
    close(clipfrac, 0.0)


def test_ppo_value_loss() -> None:
    values, old_values, returns = T([[1.0, 2.0]]), T([[1.0, 1.0]]), T([[0.5, 3.0]])
    # t0: V moved 0 -> V_clip = 1.0; (1 - 0.5)^2 = 0.25 both  -> 0.25 (not clipped)
    # t1: V moved 1 -> V_clip = 1.2; (2 - 3)^2 = 1, (1.2 - 3)^2 = 3.24 -> 3.24 (clipped)
    # loss = 0.5 * (0.25 + 3.24) / 2 = 0.8725
    loss, clipfrac = ppo_value_loss(values, old_values, returns, torch.ones(1, 2), 0.2)
    close(loss, 0.8725)
    close(clipfrac, 0.5)
    loss, clipfrac = ppo_value_loss(values, old_values, returns, T([[1.0, 0.0]]), 0.2)
    close(loss, 0.125)  # 0.5 * 0.25
    close(clipfrac, 0.0)


# kl, entropy, logprobs ----------------------------------------------------------------------


def test_kl_estimators() -> None:
    logp, logq = T([[-1.0, -2.0]]), T([[-1.5, -1.0]])  # logp - logq = [0.5, -1.0]
    close(kl_penalty(logp, logq, "k1"), [[0.5, -1.0]])
    close(kl_penalty(logp, logq, "k2"), [[0.125, 0.5]])  # 0.5 * [0.25, 1]
    close(kl_penalty(logp, logq, "abs"), [[0.5, 1.0]])
    # k3 with log r = logq - logp = [-0.5, 1.0]:
    #   e^-0.5 - 1 + 0.5 = 0.10653066 ; e^1 - 1 - 1 = 0.71828183
    close(kl_penalty(logp, logq, "k3"), [[0.10653066, 0.71828183]])
    with pytest.raises(ValueError):
        kl_penalty(logp, logq, "k4")  # type: ignore[arg-type]


def test_entropy_from_logits() -> None:
    logits = T([[[0.0, 0.0], [0.0, math.log(3.0)]]])  # (1, 2, 2)
    # uniform over 2: log 2 = 0.69314718
    # p = [0.25, 0.75]: 0.25 * 1.38629436 + 0.75 * 0.28768207 = 0.56233514
    close(entropy_from_logits(logits), [[0.69314718, 0.56233514]])


def test_logprobs_from_logits() -> None:
    logits = T([[[0.0, math.log(3.0)], [math.log(3.0), 0.0]]])  # (1, 2, 2)
    labels = T([[1, 1]])
    # log 0.75 = -0.28768207, log 0.25 = -1.38629436
    close(logprobs_from_logits(logits, labels), [[-0.28768207, -1.38629436]])
    # bf16 logits go through the row-wise float32 path; bf16 rounds log 3 to 1.09375.
    half = logprobs_from_logits(logits.bfloat16(), labels)
    assert half.dtype == torch.float32
    close(half, [[-0.28768207, -1.38629436]], atol=5e-3)
