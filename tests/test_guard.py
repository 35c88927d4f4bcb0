"""The over-optimisation guard and the degenerate-sample detectors, on planted numbers."""

from __future__ import annotations

import pytest

from worker.guard import (
    GuardConfig,
    OverOptimizationGuard,
    distinct_n,
    is_degenerate,
    length_blowup,
    longest_run,
    repetition_ratio,
)

# Detectors -------------------------------------------------------------------------------------


def test_distinct_n_pools_ngrams_over_all_texts() -> None:
    texts = ["the cat sat", "the cat ran"]
    # unigrams: the cat sat the cat ran -> 4 distinct of 6
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 3 distinct of 4
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["The THE the"], 1) == pytest.approx(1 / 3)  # lower-cased
    assert distinct_n(["one"], 2) == 0.0  # no bigram at all
    assert distinct_n([], 1) == 0.0


def test_repetition_ratio_counts_repeated_ngrams_within_a_text() -> None:
    # trigrams of "a b c a b c a b c": abc bca cab abc bca cab abc -> 3 distinct of 7
    assert repetition_ratio("a b c a b c a b c") == pytest.approx(4 / 7)
    assert repetition_ratio("the quick brown fox jumps over the lazy dog") == 0.0
    assert repetition_ratio("the the the the", n=1) == pytest.approx(3 / 4)
    assert repetition_ratio("too short", n=3) == 0.0


def test_longest_run_and_is_degenerate() -> None:
    assert longest_run("the the the") == 3
    assert longest_run("a b b a") == 2
    assert longest_run("") == 0
    assert is_degenerate("great answer the the the the")  # a run of 4
    assert is_degenerate("a b c a b c a b c")  # 4/7 of trigrams repeat > 0.5
    assert not is_degenerate("the capital of France is Paris, and it is large")
    assert not is_degenerate("the the the ok")  # a run of 3 is still allowed


def test_length_blowup_compares_with_the_starting_length() -> None:
    assert length_blowup(41.0, 20.0)
    assert length_blowup(40.0, 20.0)
    assert not length_blowup(39.9, 20.0)
    assert not length_blowup(30.0, 20.0, factor=2.0)
    assert length_blowup(30.0, 20.0, factor=1.5)
    assert not length_blowup(10.0, 0.0)  # no baseline yet


# The guard -------------------------------------------------------------------------------------


def run(guard: OverOptimizationGuard, train: list[float], heldout: list[float | None], kl=None):
    """Feed a whole run; returns the verdicts up to and including the first stop."""
    kl = kl or [1.0] * len(train)
    verdicts = []
    for step, (t, h, k) in enumerate(zip(train, heldout, kl, strict=True), start=1):
        verdicts.append(guard.update(step, t, h, k))
        if verdicts[-1].stop:
            break
    return verdicts


def test_guard_stops_when_heldout_falls_while_train_rises_and_keeps_the_best_step() -> None:
    # Planted over-optimisation: both rise for 5 steps, then the held-out reward falls
    # while the training reward keeps climbing.
    train = [0.1 * i for i in range(1, 21)]
    heldout = [0.1, 0.2, 0.3, 0.4, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15] + [0.1] * 8
    guard = OverOptimizationGuard(GuardConfig(patience=4))
    verdicts = run(guard, train, heldout)
    last = verdicts[-1]
    assert last.stop and last.reason == "overoptimization"
    assert len(verdicts) == 9  # best at step 5, four steps without improvement: 6, 7, 8, 9
    assert last.best_step == 5 and guard.best_step == 5
    assert guard.best_heldout == pytest.approx(0.5)
    assert [v.is_best for v in verdicts] == [True] * 5 + [False] * 4
    assert guard.stopped == last


def test_guard_lets_a_healthy_run_finish() -> None:
    # Both rewards rise with noise; the held-out one sets a new best at least every 3 steps.
    train = [0.1, 0.2, 0.15, 0.3, 0.35, 0.3, 0.45, 0.5, 0.48, 0.6, 0.62, 0.7]
    heldout = [0.1, 0.15, 0.12, 0.2, 0.18, 0.22, 0.21, 0.2, 0.25, 0.24, 0.27, 0.3]
    guard = OverOptimizationGuard(GuardConfig(patience=4))
    verdicts = run(guard, train, heldout)
    assert len(verdicts) == len(train)
    assert not any(v.stop for v in verdicts)
    assert guard.best_step == 12 and guard.stopped is None


def test_guard_does_not_stop_a_plateau_where_train_reward_did_not_rise() -> None:
    # Held-out flat after step 2, but the training reward fell too: converged, not gamed.
    train = [0.5, 0.6, 0.55, 0.5, 0.55, 0.58, 0.52, 0.5]
    heldout = [0.3, 0.4, 0.39, 0.38, 0.4, 0.39, 0.38, 0.37]
    verdicts = run(OverOptimizationGuard(GuardConfig(patience=3)), train, heldout)
    assert not any(v.stop for v in verdicts)


def test_guard_stops_on_the_kl_budget() -> None:
    guard = OverOptimizationGuard(GuardConfig(patience=100, kl_budget=10.0))
    verdicts = run(guard, [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], kl=[2.0, 6.0, 10.0, 12.5])
    assert len(verdicts) == 4 and verdicts[-1].reason == "kl_budget"
    # step 4 has the best held-out reward but broke the budget: the kept step is 3 (KL 10.0
    # is within it), so the registered policy never exceeds the budget it was given
    assert not verdicts[-1].is_best and verdicts[-1].best_step == 3


def test_a_first_step_past_the_kl_budget_is_kept_for_lack_of_another() -> None:
    guard = OverOptimizationGuard(GuardConfig(kl_budget=1.0))
    verdict = guard.update(1, 0.1, 0.1, 5.0)
    assert (verdict.stop, verdict.reason, verdict.is_best, verdict.best_step) == (
        True,
        "kl_budget",
        True,
        1,
    )


def test_guard_min_delta_ignores_tiny_improvements() -> None:
    guard = OverOptimizationGuard(GuardConfig(patience=2, min_delta=0.05))
    verdicts = run(guard, [0.1, 0.2, 0.3], [0.5, 0.51, 0.52])
    assert verdicts[-1].stop and verdicts[-1].best_step == 1


def test_guard_smooths_both_rewards_with_ema() -> None:
    # ema 0.5: heldout smoothed = 1.0, 0.5 * 1.0 + 0.5 * 0.0 = 0.5, then 0.25 ...
    guard = OverOptimizationGuard(GuardConfig(patience=10, ema=0.5))
    guard.update(1, 0.0, 1.0, 0.0)
    guard.update(2, 0.0, 0.0, 0.0)
    assert guard.best_heldout == 1.0
    v = guard.update(3, 0.0, 3.0, 0.0)  # 0.5 * 0.5 + 0.5 * 3.0 = 1.75 > 1.0
    assert v.is_best and guard.best_heldout == pytest.approx(1.75)


def test_guard_without_heldout_tracks_train_reward_and_only_stops_on_kl() -> None:
    guard = OverOptimizationGuard(GuardConfig(patience=1, kl_budget=5.0))
    verdicts = run(guard, [0.3, 0.2, 0.1, 0.0], [None] * 4)
    assert not any(v.stop for v in verdicts)
    assert guard.best_step == 1
