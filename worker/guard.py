"""Over-optimisation guard and degenerate-sample detectors for PPO.

A policy optimised against a learned reward model eventually finds what the model overrates
("the the the" scoring well; Gao et al. 2022, "Scaling laws for reward model
overoptimization"): the training reward keeps rising while true quality falls. Prefloop trains
a second reward model on the other half of the snapshot's prompts and scores every rollout
with both; the held-out model is the proxy for "true" quality. `OverOptimizationGuard` watches
the two curves and the KL, says when to stop, and remembers the step whose held-out score was
best, so the runner keeps that checkpoint rather than the last one.

The detectors below are pure functions over decoded text, split on whitespace (the same for
every tokenizer, so numbers compare across policies).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# GuardConfig lives with the params checks the web process runs without torch; re-exported.
from app.domain.job_params import GuardConfig

# Degenerate samples ----------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Lower-cased whitespace tokens: the unit of every detector here."""
    return text.lower().split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of all texts pooled (Li et al. 2016): 1.0 when no
    n-gram repeats anywhere, towards 0 as outputs collapse onto the same phrases; 0.0 when the
    texts have no n-gram at all. RLHF is known to lower it; the PPO metrics make that visible.
    """
    pooled = [g for text in texts for g in ngrams(words(text), n)]
    return len(set(pooled)) / len(pooled) if pooled else 0.0


def repetition_ratio(text: str, n: int = 3) -> float:
    """Fraction of a text's n-grams that repeat an earlier n-gram of the same text.

    Ordinary prose repeats almost no trigram (ratio near 0); a looping sample repeats nearly
    all of them ("a b c a b c a b c": 4 of 7 trigrams are repeats). 0.0 for texts shorter
    than n words.
    """
    grams = ngrams(words(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def longest_run(text: str) -> int:
    """Length of the longest run of one word repeated back to back ("the the the" -> 3)."""
    best = run = 0
    previous = None
    for word in words(text):
        run = run + 1 if word == previous else 1
        previous = word
        best = max(best, run)
    return best


def is_degenerate(text: str, *, max_repetition: float = 0.5, max_run: int = 4, n: int = 3) -> bool:
    """Whether a sample looks like reward hacking by repetition: more than `max_repetition` of
    its n-grams are repeats, or one word repeats `max_run` times or more in a row."""
    return repetition_ratio(text, n) > max_repetition or longest_run(text) >= max_run


def length_blowup(mean_length: float, baseline_length: float, factor: float = 2.0) -> bool:
    """Whether responses have grown to `factor` times their length at the start of training:
    length is the cheapest thing for a policy to inflate when the reward model likes it."""
    return baseline_length > 0 and mean_length >= factor * baseline_length


# The guard -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardVerdict:
    """What the guard concluded after one step."""

    stop: bool
    reason: str | None  # "overoptimization" | "kl_budget" | None
    is_best: bool  # this step has the best held-out reward so far: checkpoint it
    best_step: int


class OverOptimizationGuard:
    """Fed (step, train_reward, heldout_reward, kl) once per PPO step; pure bookkeeping.

    Without a held-out reward (None), the best step is tracked on the training reward and
    only the KL budget can stop the run.
    """

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.best_step: int | None = None
        self.best_heldout = float("-inf")
        self.stopped: GuardVerdict | None = None
        self._train_at_best = 0.0
        self._train: float | None = None  # smoothed training reward
        self._heldout: float | None = None  # smoothed held-out reward

    def _smooth(self, previous: float | None, value: float) -> float:
        if previous is None:
            return value
        return self.config.ema * previous + (1.0 - self.config.ema) * value

    def update(
        self, step: int, train_reward: float, heldout_reward: float | None, kl: float
    ) -> GuardVerdict:
        self._train = self._smooth(self._train, train_reward)
        watched = train_reward if heldout_reward is None else heldout_reward
        self._heldout = self._smooth(self._heldout, watched)

        budget = self.config.kl_budget
        over_budget = budget is not None and kl > budget
        # A step past the KL budget is never the one to keep (only the very first step, when
        # there is nothing else: the run then stops at once with it).
        is_best = self.best_step is None or (
            not over_budget and self._heldout > self.best_heldout + self.config.min_delta
        )
        if is_best:
            self.best_step, self.best_heldout = step, self._heldout
            self._train_at_best = self._train
        assert self.best_step is not None

        reason = None
        if over_budget:
            reason = "kl_budget"
        elif (
            heldout_reward is not None
            and step - self.best_step >= self.config.patience
            and self._train > self._train_at_best
        ):
            reason = "overoptimization"
        verdict = GuardVerdict(reason is not None, reason, is_best, self.best_step)
        if verdict.stop:
            self.stopped = verdict
        return verdict
