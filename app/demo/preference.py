"""The simulated annotators' preference: a documented scoring rule plus Bradley–Terry noise.

An answer's score (higher is better) adds up four things a person asked for a short, helpful
answer would look at:

  + 2.0 x keyword coverage   the share of the prompt's keywords the answer mentions (a keyword
                             counts when a word of the answer starts with it, ignoring case:
                             "sleep" matches "sleeping")
  - 0.05 per word past 40    concise: up to CONCISE_WORDS words cost nothing
  - 3.0 x repetition         the share of the answer's word trigrams that repeat an earlier one
  - 0.5 if unfinished        the answer stops mid-sentence (no final . ! ? or closing quote,
                             bracket, code fence)
  an empty answer scores EMPTY_SCORE.

An annotator prefers A over B with probability sigmoid((score_A - score_B) / temperature)
(Bradley–Terry with the scores as strengths), drawn from the annotator's own seeded
`random.Random`, so two annotators disagree on close pairs and a run is reproducible. The
keywords come from the bundled prompt's metadata: the annotator "knows what the prompt asks",
as a person reading it would.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

KEYWORD_WEIGHT = 2.0
CONCISE_WORDS = 40
LENGTH_PENALTY_PER_WORD = 0.05
REPETITION_WEIGHT = 3.0
UNFINISHED_PENALTY = 0.5
EMPTY_SCORE = -5.0
DEFAULT_TEMPERATURE = 0.5
SENTENCE_ENDS = (".", "!", "?", '"', "'", ")", "]", "`", "*", "»", "”")

_WORD = re.compile(r"[\w']+", re.UNICODE)


@dataclass(frozen=True)
class Score:
    """An answer's score and its parts (what the demo prints and the tests check)."""

    total: float
    coverage: float  # 0..1
    words: int
    repetition: float  # 0..1
    finished: bool


def words_of(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def keyword_coverage(words: Sequence[str], keywords: Sequence[str]) -> float:
    """Share of `keywords` that some word starts with (0 when there are no keywords)."""
    wanted = [k.lower() for k in keywords if k.strip()]
    if not wanted:
        return 0.0
    hits = sum(1 for k in wanted if any(w.startswith(k) for w in words))
    return hits / len(wanted)


def repetition(words: Sequence[str]) -> float:
    """Share of word trigrams that already appeared earlier in the answer (0 below 4 words)."""
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    if len(trigrams) < 2:
        return 0.0
    return 1.0 - len(set(trigrams)) / len(trigrams)


def is_finished(text: str) -> bool:
    return text.rstrip().endswith(SENTENCE_ENDS)


def score(answer: str, keywords: Sequence[str]) -> Score:
    """The rule in the module docstring."""
    words = words_of(answer)
    if not words:
        return Score(EMPTY_SCORE, 0.0, 0, 0.0, False)
    coverage = keyword_coverage(words, keywords)
    rep = repetition(words)
    finished = is_finished(answer)
    total = (
        KEYWORD_WEIGHT * coverage
        - LENGTH_PENALTY_PER_WORD * max(0, len(words) - CONCISE_WORDS)
        - REPETITION_WEIGHT * rep
        - (0.0 if finished else UNFINISHED_PENALTY)
    )
    return Score(total, coverage, len(words), rep, finished)


def preference_probability(a: str, b: str, keywords: Sequence[str], temperature: float) -> float:
    """P(an annotator prefers `a` over `b`) under Bradley–Terry on the rule's scores."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    diff = (score(a, keywords).total - score(b, keywords).total) / temperature
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, diff))))


def choose(
    candidates: Sequence[tuple[int, str]],
    keywords: Sequence[str],
    rng: random.Random,
    temperature: float = DEFAULT_TEMPERATURE,
) -> int:
    """The id of the preferred candidate of a pair, drawn with Bradley–Terry noise."""
    if len(candidates) != 2:
        raise ValueError(f"a pairwise choice needs 2 candidates, got {len(candidates)}")
    (id_a, text_a), (id_b, text_b) = candidates
    p = preference_probability(text_a, text_b, keywords, temperature)
    return id_a if rng.random() < p else id_b


def annotator_rng(seed: int, username: str) -> random.Random:
    """Each simulated annotator's own reproducible stream."""
    return random.Random(f"{seed}:{username}")
