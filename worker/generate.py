"""Sampling completions from a policy: the `generate` job, and the rollout half of PPO.

A prompt is plain text or a list of chat messages ({"role", "content"}). Both go through the
tokenizer's chat template when it has one (SmolLM2-Instruct does), so a policy is always asked
the way it was instruction-tuned; tokenizers without a template (the tiny test models) get
the plain text.

Batches are left-padded: every row's last prompt token sits in the same column, so new tokens
are appended in lockstep and the response occupies the same columns in every row. Position ids
count real tokens only (`position_ids`), as Hugging Face's `generate` does, and the PPO
forward passes use the same function so a token's log-probability is computed under the same
positions it was sampled with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# GenerateConfig lives with the params checks the web process runs without torch; re-exported.
from app.domain.job_params import GenerateConfig
from worker.models import ensure_smollm2_safetensors

Message = dict[str, str]
Prompt = str | list[Message]

DEFAULT_POLICY = "smollm2"


@dataclass(frozen=True)
class Generations:
    """Completions per prompt (deduplicated, in sampling order) and what was dropped."""

    completions: list[list[str]]
    dropped_duplicates: int  # identical to an earlier sample of the same prompt
    dropped_empty: int  # the model stopped at once: nothing to show an annotator
    missing_eos: int  # samples cut at max_new_tokens (kept, but worth knowing)


# Prompts and padding --------------------------------------------------------------------------


def render_prompt_text(prompt: Prompt) -> str:
    """The prompt as one plain string: its text, or chat messages as a `role: content`
    transcript. The same rendering as app.services.training_data.prompt_text, so a reward
    model sees prompts during PPO the way it saw them in training."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids of one prompt, ending where the model's answer should begin.

    With a chat template, a plain prompt becomes one user turn and the assistant header is
    appended (add_generation_prompt). The template already contains any special tokens, so
    the tokenizer adds none of its own.
    """
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(render_prompt_text(prompt))["input_ids"]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), both (B, P), padded on the left to the longest row."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, P)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, P)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counting real tokens only, 0 on left padding: (B, L) -> (B, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id, falling back to EOS (decoder tokenizers often ship without a pad token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return pad


# Sampling --------------------------------------------------------------------------------------


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block under torch's global generator seeded with `seed`, then restore it.

    Hugging Face's `generate` samples from the global generator and takes no Generator
    argument; forking the state keeps the randomness a parameter of the call while leaving
    the caller's generator untouched.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int,
    pad_token_id: int,
) -> Tensor:
    """New tokens only: (B, P) left-padded prompts -> (B, R) responses, R <= max_new_tokens.

    Rows that emitted EOS are filled with `pad_token_id` after it; generation ends early when
    every row has stopped. Randomness comes from torch's global generator (see `seeded`).
    """
    do_sample = temperature > 0
    generation_config = GenerationConfig(
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=top_k if do_sample else None,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    out = model.generate(  # type: ignore[operator]
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=generation_config,
    )  # (B, P + R)
    return out[:, input_ids.shape[1] :]


def eos_mask(responses: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """Which response tokens count: everything up to and including the first EOS.

    The EOS itself stays in: stopping is an action the policy chose, and the sequence-level
    reward is credited to it. responses: (B, R) -> mask (B, R) float, has_eos (B,) bool.
    """
    is_eos = responses == eos_token_id  # (B, R)
    has_eos = is_eos.any(dim=1)  # (B,)
    # Tokens after the first EOS have at least one EOS strictly before them.
    eos_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # (B, R)
    return (~eos_before).float(), has_eos


def decode_responses(
    tokenizer: PreTrainedTokenizerBase, responses: Tensor, mask: Tensor, has_eos: Tensor
) -> list[str]:
    """Text of each response without its EOS and padding, stripped of outer whitespace."""
    lengths = mask.sum(dim=1).long() - has_eos.long()  # (B,) tokens before the EOS
    rows = [row[:n].tolist() for row, n in zip(responses, lengths.tolist(), strict=True)]
    return [t.strip() for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    config: GenerateConfig,
    *,
    seed: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Generations:
    """`config.n` samples per prompt, deduplicated per prompt, with counts of what was dropped.

    The prompt list is expanded to n copies each and cut into batches of `config.batch_size`
    sequences; `seed` (default `config.seed`) makes the result reproducible for a given
    config and batch size. `on_progress(samples_done, samples_total)` follows each batch.
    """
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, pad_id_of(tokenizer)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    jobs = [i for i in range(len(prompts)) for _ in range(config.n)]  # prompt index per sample
    texts: list[str] = []
    missing_eos = 0
    was_training = model.training
    model.eval()
    with seeded(config.seed if seed is None else seed, device):
        for start in range(0, len(jobs), config.batch_size):
            batch = jobs[start : start + config.batch_size]
            input_ids, attention_mask = left_pad([encoded[i] for i in batch], pad)  # (B, P)
            responses = sample_responses(
                model,
                input_ids.to(device),
                attention_mask.to(device),
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                top_p=config.top_p,
                top_k=config.top_k,
                eos_token_id=eos,
                pad_token_id=pad,
            ).cpu()  # (B, R)
            mask, has_eos = eos_mask(responses, eos)
            missing_eos += int((~has_eos).sum())
            texts.extend(decode_responses(tokenizer, responses, mask, has_eos))
            if on_progress is not None:
                on_progress(min(start + config.batch_size, len(jobs)), len(jobs))
    model.train(was_training)

    completions: list[list[str]] = [[] for _ in prompts]
    seen: list[set[str]] = [set() for _ in prompts]
    duplicates = empty = 0
    for i, text in zip(jobs, texts, strict=True):
        if not text:
            empty += 1
        elif text in seen[i]:
            duplicates += 1
        else:
            seen[i].add(text)
            completions[i].append(text)
    return Generations(completions, duplicates, empty, missing_eos)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    config: GenerateConfig,
    *,
    seed: int | None = None,
) -> list[list[str]]:
    """Deduplicated completions per prompt (see `sample_completions` for the drop counts)."""
    return sample_completions(model, tokenizer, prompts, config, seed=seed).completions


# Loading ---------------------------------------------------------------------------------------


def load_policy(
    path_or_default: str | Path | None,
    cache_dir: Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer, offline, in eval mode.

    None or "smollm2" is the packaged SmolLM2-135M-Instruct (converted once into `cache_dir`);
    otherwise a `save_pretrained` directory or a Hub id served from the local cache. A
    directory holding a LoRA adapter (`adapter_config.json`, as PPO saves with
    `save_merged=False`) is loaded onto its base model and merged, so callers always get a
    plain model.
    """
    if path_or_default is None or path_or_default == DEFAULT_POLICY:
        path: str | Path = ensure_smollm2_safetensors(Path(cache_dir))
    else:
        path = path_or_default
    if (Path(path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer
