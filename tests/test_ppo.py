"""PPO on tiny models: it learns a planted reward, the KL stays bounded, the pieces agree.

The tiny policy is worker.models.tiny_causal_lm (2 layers, 32 wide) over a 16-token
word-level vocabulary; freshly initialised, it samples nearly uniformly, so the planted
target word appears in about 1/16 of response tokens. Each test runs in seconds on 2 CPUs.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch

from worker.generate import left_pad, load_policy, position_ids
from worker.guard import GuardConfig, OverOptimizationGuard
from worker.losses import logprobs_from_logits
from worker.models import save_atomic, tiny_causal_lm, tiny_reward_model, tiny_tokenizer
from worker.ppo import PolicyWithValue, PPOConfig, SequenceClassifierReward, train_ppo

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "good"]  # + 5 specials = 16 tokens
PROMPTS = [" ".join(WORDS[i : i + 3]) for i in range(8)]
EOS = 4


def fraction_good(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """The planted reward: the fraction of response words that are "good" (0 when empty)."""
    return torch.tensor([r.split().count("good") / max(len(r.split()), 1) for r in responses])


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads
    spinning against other processes make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    tokenizer = tiny_tokenizer(WORDS, kind="causal")
    assert len(tokenizer) == 16 and tokenizer.eos_token_id == EOS
    return tiny_causal_lm(len(tokenizer), seed=0), tokenizer


def small_config(**overrides) -> PPOConfig:
    base = dict(
        lr=3e-3,
        batch_size=16,
        mini_batch_size=8,
        ppo_epochs=2,
        max_new_tokens=6,
        init_kl_coef=0.05,
        adaptive_kl=False,
        total_steps=30,
        seed=0,
    )
    return PPOConfig(**{**base, **overrides})


def test_tiny_policy_learns_the_planted_reward_with_bounded_kl(tiny) -> None:
    model, tokenizer = tiny
    progress = []
    # Adaptive KL with a target below what the run reaches: the coefficient must rise.
    config = small_config(adaptive_kl=True, target_kl=4.0, kl_horizon=500)
    start = time.perf_counter()
    result = train_ppo(
        config, model, tokenizer, fraction_good, PROMPTS, on_progress=progress.append
    )
    seconds = time.perf_counter() - start
    history = result["history"]
    assert len(history) == result["steps"] == 30 and len(progress) == 30

    def mean(key: str, rows: list[dict]) -> float:
        return sum(r[key] for r in rows) / len(rows)

    first, last = history[:3], history[-5:]
    # Near-uniform start: "good" is ~1/16 of tokens.
    assert mean("reward_mean", first) < 0.15
    # Learned: well over half of the tokens are "good" by the end.
    assert mean("reward_mean", last) > 0.5, [round(h["reward_mean"], 3) for h in history]
    # KL bounded: with beta ~0.05 the KL-regularised optimum puts p(good) ~ 0.65, about
    # 1.2 nats per token (~7 per 6-token response); collapsing onto "good" would cost
    # log(16) = 2.77 nats per token, 16.6 per response. The penalty holds it well below.
    assert 0.0 < mean("kl", last) < 12.0, [round(h["kl"], 2) for h in history]
    assert abs(history[0]["kl"]) < 0.5  # the policy starts as the reference
    assert history[-1]["kl_coef"] > config.init_kl_coef  # KL above target raised the penalty
    # Sharper policy, less diverse samples: visible in the metrics.
    assert mean("entropy", last) < mean("entropy", first) - 0.5
    assert mean("distinct_1", last) < mean("distinct_1", first)
    for key in [
        "reward_std",
        "kl_coef",
        "non_score_reward",
        "policy_loss",
        "value_loss",
        "clipfrac",
        "value_clipfrac",
        "approx_kl",
        "response_length",
        "no_eos_frac",
        "distinct_2",
        "repetition",
        "degenerate_frac",
        "length_ratio",
        "length_blowup",
        "time_generate_s",
        "time_score_s",
        "time_forward_s",
        "time_update_s",
        "time_step_s",
    ]:
        assert key in history[-1], key
    assert progress[-1]["total_steps"] == 30 and "eta_s" in progress[-1]
    assert result["best_checkpoint"] is None and not result["stopped_early"]
    print(f"tiny PPO: 30 steps in {seconds:.1f}s, reward {mean('reward_mean', last):.2f}")


def test_rollout_log_probs_match_the_distribution_tokens_were_sampled_from(tiny) -> None:
    """Left padding and position ids agree between generate() and PPO's forward passes: the
    log-probability PPO computes for a sampled token is the one it was sampled with."""
    model, _ = tiny
    input_ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], pad_id=EOS)  # (3, 5)
    torch.manual_seed(0)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        do_sample=True,
        max_new_tokens=5,
        min_new_tokens=5,
        eos_token_id=EOS,
        pad_token_id=EOS,
        output_logits=True,
        return_dict_in_generate=True,
    )
    responses = out.sequences[:, input_ids.shape[1] :]  # (3, 5)
    sampled_with = logprobs_from_logits(torch.stack(out.logits, dim=1), responses)  # (3, 5)

    policy = PolicyWithValue(model).eval()
    full_mask = torch.cat([mask, torch.ones_like(responses)], dim=1)
    with torch.no_grad():
        logits, values = policy(out.sequences, full_mask, responses.shape[1])
    assert logits.shape == (3, 5, 16) and values.shape == (3, 5)
    torch.testing.assert_close(
        logprobs_from_logits(logits, responses), sampled_with, atol=1e-4, rtol=0
    )
    assert position_ids(full_mask)[1].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]
    assert torch.count_nonzero(values) == 0  # the value head starts at zero


def test_lora_reference_is_the_base_model_and_checkpoints_are_adapters(tiny, tmp_path) -> None:
    model, tokenizer = tiny
    save_atomic(model, tokenizer, tmp_path / "base", {"kind": "policy"})
    policy, tokenizer = load_policy(tmp_path / "base", tmp_path / "cache")
    original = copy.deepcopy(policy)
    config = small_config(
        use_lora=True, lora_r=4, lora_alpha=8, lr=2e-2, total_steps=3, save_merged=False
    )
    result = train_ppo(
        config,
        policy,
        tokenizer,
        fraction_good,
        PROMPTS,
        out_dir=tmp_path / "run",
        metadata={"reward_model_id": 7, "parent_id": None},
    )
    # LoRA's B starts at zero: at step 1 policy and reference are the same function.
    assert abs(result["history"][0]["kl"]) < 1e-5
    assert result["history"][-1]["kl"] != 0.0  # and the adapters did train

    # The reference is the base weights: LoRA wrapped them (in place) but never changed them.
    trained = {k.replace("base_layer.", ""): v for k, v in policy.state_dict().items()}
    for name, weight in original.state_dict().items():
        assert torch.equal(trained[name], weight), name
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained.items())
    ids = torch.tensor([[5, 6, 7, 8]])

    ckpt = Path(result["best_checkpoint"])
    assert ckpt.name == "step-00003" and result["last_checkpoint"] == str(ckpt)
    assert (ckpt / "adapter_config.json").exists()
    meta = json.loads((ckpt / "prefloop.json").read_text())
    assert meta["kind"] == "policy" and meta["reward_model_id"] == 7 and meta["step"] == 3
    assert meta["config"]["use_lora"] is True
    merged, _ = load_policy(ckpt, tmp_path / "cache")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, policy(input_ids=ids).logits)


def test_guard_stops_planted_overoptimisation_and_keeps_the_best_checkpoint(tiny, tmp_path) -> None:
    """The planted held-out reward agrees with the training one at first and then turns
    (a few "good"s are good, many are gaming it: min(f, 0.6 - f), best at f = 0.3). As PPO
    keeps raising the training reward, the held-out one falls, and the guard stops the run
    and points at the checkpoint from before the turn."""
    model, tokenizer = tiny

    def heldout(prompts: list[str], responses: list[str]) -> torch.Tensor:
        f = fraction_good(prompts, responses)
        return torch.minimum(f, 0.6 - f)

    guard = OverOptimizationGuard(GuardConfig(patience=4, ema=0.5))
    result = train_ppo(
        small_config(total_steps=30),
        model,
        tokenizer,
        fraction_good,
        PROMPTS,
        heldout_reward_fn=heldout,
        guard=guard,
        out_dir=tmp_path / "run",
    )
    history = result["history"]
    steps, best = result["steps"], result["best_step"]
    assert result["stopped_early"] and result["stop_reason"] == "overoptimization"
    assert steps < 30 and best == guard.best_step and 1 < best <= steps - 4
    at_best, last = history[best - 1], history[-1]
    assert last["reward_mean"] > at_best["reward_mean"]  # training reward kept rising ...
    assert last["heldout_reward_mean"] < at_best["heldout_reward_mean"]  # ... held-out fell
    # Only the best and the last checkpoints remain; superseded bests were deleted.
    kept = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert kept == [f"step-{best:05d}", f"step-{steps:05d}"]
    assert result["best_checkpoint"] == str(tmp_path / "run" / f"step-{best:05d}")
    meta = json.loads((tmp_path / "run" / f"step-{best:05d}" / "prefloop.json").read_text())
    assert meta["metrics"]["best_step"] == best


@pytest.mark.parametrize("kind", ["encoder", "causal"])
def test_sequence_classifier_reward_scores_batches_as_single_texts(kind: str) -> None:
    tokenizer = tiny_tokenizer(WORDS, kind=kind)
    model = tiny_reward_model(len(tokenizer), seed=1, kind=kind).eval()
    if kind == "causal":
        model.config.pad_token_id = tokenizer.pad_token_id
    reward = SequenceClassifierReward(model, tokenizer, max_length=32, batch_size=2)
    prompts = ["a b", "c", "d e f"]
    responses = ["good good", "a b c d e", ""]
    batched = reward(prompts, responses)
    assert batched.shape == (3,) and batched.dtype == torch.float32
    single = torch.cat([reward([p], [r]) for p, r in zip(prompts, responses, strict=True)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    assert len(set(batched.tolist())) == 3  # the texts really were scored differently
