"""worker/ppo_math.py against numbers worked out by hand."""

from __future__ import annotations

import pytest
import torch

from worker.ppo_math import AdaptiveKLController, FixedKLController, per_token_rewards

T = torch.tensor


def test_adaptive_kl_controller_clips_the_error_and_scales_by_batch_over_horizon() -> None:
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    # KL 9 vs target 6: error 0.5, clipped to 0.2; 16 samples: 1 + 0.2 * 16 / 10000 = 1.00032
    ctl.update(current_kl=9.0, n_steps=16)
    assert ctl.value == pytest.approx(0.1 * 1.00032, abs=1e-12)
    # KL 3: error -0.5 -> -0.2; 100 samples: 1 - 0.2 * 100 / 10000 = 0.998
    ctl.update(current_kl=3.0, n_steps=100)
    assert ctl.value == pytest.approx(0.1 * 1.00032 * 0.998, abs=1e-12)


def test_adaptive_kl_controller_inside_the_clip_band_is_proportional() -> None:
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=5.0, horizon=1_000)
    # KL 5.5: error 0.1 (unclipped); 100 samples: 1 + 0.1 * 100 / 1000 = 1.01
    ctl.update(current_kl=5.5, n_steps=100)
    assert ctl.value == pytest.approx(0.202, abs=1e-12)
    # KL 4.5: error -0.1: 0.202 * 0.99
    ctl.update(current_kl=4.5, n_steps=100)
    assert ctl.value == pytest.approx(0.19998, abs=1e-12)
    # On target: unchanged
    ctl.update(current_kl=5.0, n_steps=100)
    assert ctl.value == pytest.approx(0.19998, abs=1e-12)


def test_fixed_kl_controller_never_moves() -> None:
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=64)
    assert ctl.value == 0.05


def test_per_token_rewards_put_the_score_on_the_last_valid_token() -> None:
    scores = T([1.0, -2.0])
    logprobs = T([[-1.0, -2.0, -3.0], [-0.5, -3.0, -3.0]])
    ref_logprobs = T([[-1.5, -2.0, -2.0], [-1.0, -0.5, -0.5]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards, kl = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1, kind="k1")
    # k1 = logp - logq: row 0 [0.5, 0, -1]; row 1 [0.5, masked, masked]
    torch.testing.assert_close(kl, T([[0.5, 0.0, -1.0], [0.5, 0.0, 0.0]]))
    # -0.1 * kl, then + score at index 2 (row 0) and index 0 (row 1)
    torch.testing.assert_close(rewards, T([[-0.05, 0.0, 0.1 + 1.0], [-0.05 - 2.0, 0.0, 0.0]]))


def test_per_token_rewards_with_k3_and_padding() -> None:
    # k3 = exp(logq - logp) - 1 - (logq - logp); logq - logp = -1 -> e^-1 - 1 + 1 = 0.36787944
    scores = T([0.5])
    logprobs = T([[-1.0, -2.0]])
    ref_logprobs = T([[-2.0, -9.0]])
    mask = T([[1.0, 0.0]])
    rewards, kl = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.5, kind="k3")
    torch.testing.assert_close(kl, T([[0.36787944, 0.0]]))
    torch.testing.assert_close(rewards, T([[0.5 - 0.5 * 0.36787944, 0.0]]))


def test_per_token_rewards_refuse_an_empty_response() -> None:
    with pytest.raises(ValueError, match="at least one valid token"):
        per_token_rewards(T([1.0]), T([[0.0]]), T([[0.0]]), T([[0.0]]), kl_coef=0.1)
