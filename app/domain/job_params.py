"""What a training job's params may say: the trainer configs and their checks, without torch.

A job's params are checked twice, by these same functions: when a person creates the job
(`app.services.jobs.enqueue` answers 422 at once, so a typo or `epochs: -3` never reaches a
worker) and again when a worker runs it (`worker.runner`; the row may come from the loop's
stored settings or predate a rule). The config dataclasses live here rather than beside their
training loops because the web process imports no torch; worker.reward, worker.generate,
worker.ppo and worker.guard re-export them, so `from worker.reward import RewardConfig` works
as before.

Pure: no I/O. Whether a backbone exists and how many positions it has is the worker's
question (`worker.models.check_backbone`): the web process may not even see the worker's disk.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

REWARD = "reward"
PPO = "ppo"
GENERATE = "generate"

MIN_MAX_LENGTH = 8
"""Fewer tokens per (prompt, completion) leave no room for both and the special tokens."""
MAX_SEED = 2**63 - 1
"""torch.manual_seed takes a 64-bit integer."""
KLKind = Literal["k1", "k2", "k3", "abs"]
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
"""The estimators worker.losses.kl_penalty knows."""


class InvalidParams(ValueError):
    """Params a job of that kind cannot run with; the message names the param and the rule."""


def _require(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise InvalidParams(f"{name} must be {rule}, not {value!r}")


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _seed(value: int) -> None:
    _require(0 <= value <= MAX_SEED, "seed", f"a whole number from 0 to {MAX_SEED}", value)


# --- the trainer configs ------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardConfig:
    """Everything that decides a reward training run; stored in the checkpoint's prefloop.json.

    `batch_size` counts judgments (groups), not pairs or completions: the loss averages over
    judgments, so that is the unit a step is made of.
    """

    backbone: str | None = None  # None/"minilm": packaged MiniLM-L6; "smollm2"; path; HF id
    max_length: int = 512  # tokens per (prompt, completion); the prompt is truncated first
    batch_size: int = 16  # judgments per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-5
    weight_decay: float = 0.0
    epochs: int = 1
    warmup_ratio: float = 0.1  # fraction of optimizer steps with linear warmup
    eval_fraction: float = 0.1  # fraction of prompts held out
    seed: int = 0
    margin_from_strength: bool = False  # strength s in 1..3 -> margin margin_scale * (s - 1)
    margin_scale: float = 0.5
    keep_ties: bool = True  # ties become target-0.5 pairs; otherwise they are dropped
    center_coef: float = 0.0  # reward_centering_loss coefficient (0 disables)
    length_grouped: bool = True  # batch judgments of similar length to cut padding
    bf16: bool | None = None  # None: bf16 autocast when on a GPU that supports it
    disable_dropout: bool = True  # dropout makes the two sides of a pair see different nets
    max_grad_norm: float = 1.0  # 0 disables clipping
    # CPU only: split a batch's forward into length-sorted chunks when that saves more padded
    # tokens than this per extra pass (see split_rows); None: one pass.
    split_overhead_tokens: int | None = 64
    cache_dir: str | None = None  # where "smollm2" is converted to safetensors

    def __post_init__(self) -> None:
        """Ranges a run needs; without them `epochs: -3` "succeeded" with an untrained model
        and a negative `eval_fraction` held out data from the other end of the list."""
        if self.backbone is not None:
            _require(bool(self.backbone.strip()), "backbone", "a name, path or model id", "")
        _require(
            self.max_length >= MIN_MAX_LENGTH,
            "max_length",
            f"at least {MIN_MAX_LENGTH} tokens",
            self.max_length,
        )
        for name in ("batch_size", "grad_accum", "epochs"):
            _require(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))
        _require(_finite(self.lr) and self.lr > 0, "lr", "a number above 0", self.lr)
        for name in ("weight_decay", "margin_scale", "center_coef", "max_grad_norm"):
            value = getattr(self, name)
            _require(_finite(value) and value >= 0, name, "a number of at least 0", value)
        for name in ("warmup_ratio", "eval_fraction"):
            value = getattr(self, name)
            _require(0 <= value < 1, name, "at least 0 and below 1", value)
        _seed(self.seed)
        if self.split_overhead_tokens is not None:
            _require(
                self.split_overhead_tokens >= 0,
                "split_overhead_tokens",
                "at least 0, or null for one forward pass",
                self.split_overhead_tokens,
            )


@dataclass(frozen=True)
class GenerateConfig:
    """How completions are sampled; stored with the completions it produced."""

    n: int = 4  # samples per prompt (before deduplication)
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy (then n > 1 only yields duplicates)
    top_p: float = 0.95  # 1.0 disables nucleus sampling
    top_k: int = 0  # 0 disables top-k
    batch_size: int = 16  # sequences per generate() call: bounds memory, not results' count
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n", "max_new_tokens", "batch_size"):
            _require(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))
        _require(
            _finite(self.temperature) and self.temperature >= 0,
            "temperature",
            "a number of at least 0 (0 = greedy)",
            self.temperature,
        )
        _require(0 < self.top_p <= 1, "top_p", "above 0 and at most 1", self.top_p)
        _require(self.top_k >= 0, "top_k", "at least 0 (0 = off)", self.top_k)
        _seed(self.seed)


@dataclass(frozen=True)
class PPOConfig:
    """Everything that decides a PPO run; stored in every checkpoint's prefloop.json."""

    lr: float = 1e-5  # 1e-4 is a better start with use_lora
    batch_size: int = 16  # prompts (= responses) per rollout, per process
    mini_batch_size: int = 4  # responses per gradient step
    ppo_epochs: int = 4  # passes over each rollout batch
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    init_kl_coef: float = 0.05
    adaptive_kl: bool = True
    target_kl: float = 6.0  # nats per response (sum over its tokens), as in TRL
    kl_horizon: int = 10_000  # samples over which the coefficient may move by ~20%
    kl_estimator: KLKind = "k1"
    max_prompt_tokens: int = 512  # longer prompts keep their end
    max_new_tokens: int = 64
    temperature: float = 1.0  # sampling temperature; log-probs use the same scaled logits
    missing_eos_penalty: float | None = None  # subtracted from the score of cut responses
    whiten_rewards: bool = False
    total_steps: int = 100
    seed: int = 0
    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    value_head: Literal["shared"] = "shared"  # see worker/ppo.py's docstring for why
    save_merged: bool = True  # LoRA checkpoints as merged full models (else adapter only)
    length_blowup_factor: float = 2.0  # flag when responses grow this much past step 1

    def __post_init__(self) -> None:
        if not (_finite(self.temperature) and self.temperature > 0):
            raise InvalidParams("PPO samples from the policy: temperature must be > 0")
        if not 0 < self.mini_batch_size <= self.batch_size:
            raise InvalidParams("mini_batch_size must be in 1..batch_size")
        _require(_finite(self.lr) and self.lr > 0, "lr", "a number above 0", self.lr)
        for name in (
            "ppo_epochs",
            "kl_horizon",
            "max_prompt_tokens",
            "max_new_tokens",
            "total_steps",
            "lora_r",
            "lora_alpha",
        ):
            _require(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            _require(0 <= value <= 1, name, "from 0 to 1", value)
        for name in ("clip_range", "clip_range_value", "target_kl"):
            value = getattr(self, name)
            _require(_finite(value) and value > 0, name, "a number above 0", value)
        for name in ("vf_coef", "max_grad_norm", "init_kl_coef"):
            value = getattr(self, name)
            _require(_finite(value) and value >= 0, name, "a number of at least 0", value)
        _require(
            self.kl_estimator in KL_ESTIMATORS,
            "kl_estimator",
            f"one of {', '.join(KL_ESTIMATORS)}",
            self.kl_estimator,
        )
        _require(self.value_head == "shared", "value_head", "shared", self.value_head)
        if self.missing_eos_penalty is not None:
            _require(
                _finite(self.missing_eos_penalty),
                "missing_eos_penalty",
                "a number or null",
                self.missing_eos_penalty,
            )
        _require(
            _finite(self.length_blowup_factor) and self.length_blowup_factor >= 1,
            "length_blowup_factor",
            "a number of at least 1",
            self.length_blowup_factor,
        )
        _seed(self.seed)


@dataclass(frozen=True)
class GuardConfig:
    """When the guard stops a run.

    `patience`: steps without a new best held-out reward (by more than `min_delta`) after
    which, if the training reward rose over the same steps, the run is over-optimising.
    `kl_budget`: KL to the reference (nats per response) beyond which the run stops whatever
    the rewards say; None disables it. `ema`: smoothing of both rewards before comparing
    (0 = raw), since per-batch rewards are noisy.
    """

    patience: int = 10
    min_delta: float = 0.0
    kl_budget: float | None = None
    ema: float = 0.0

    def __post_init__(self) -> None:
        _require(self.patience >= 1, "patience", "at least 1", self.patience)
        _require(
            _finite(self.min_delta) and self.min_delta >= 0,
            "min_delta",
            "a number of at least 0",
            self.min_delta,
        )
        if self.kl_budget is not None:
            _require(
                _finite(self.kl_budget) and self.kl_budget > 0,
                "kl_budget",
                "a number above 0, or null for none",
                self.kl_budget,
            )
        _require(0 <= self.ema < 1, "ema", "at least 0 and below 1", self.ema)


# --- params the runner reads itself -------------------------------------------------------------

RUNNER_PARAMS = {
    "trigger": "who asked for the job (auto = the every-N-judgments schedule, chain = the loop)",
    "after_job": "the job whose success started this one (the loop's chaining)",
    "fail_after_step": "fault injection: raise after this optimizer step (crash-safety tests)",
}
"""Params every kind accepts and the runner reads itself (or keeps for the record)."""

REWARD_RUNNER_PARAMS = {
    "heldout_split": "also train a held-out reward model on a separate part of the prompts",
    "heldout_fraction": "the held-out model's share of the prompts (default 0.5)",
    "snapshot_id": "train on this snapshot of the project (default: a new snapshot of every "
    "judgment, taken when the job starts)",
}
GENERATE_RUNNER_PARAMS = {
    "policy_id": "the policy model version to sample from (default: the packaged SmolLM2)",
    "prompts": "waiting (default) | all | heldout | a list of prompt ids",
    "limit": "at most this many prompts",
    "device": "auto (default: cuda when there is one) | cpu | cuda | cuda:N",
}
PPO_RUNNER_PARAMS = {
    "reward_model_id": "default: the project's newest reward model",
    "parent_policy_id": "default: the project's newest policy, else the packaged SmolLM2",
    "heldout_reward_model_id": "default: the reward model's held-out partner, if it has one",
    "prompts": "all (default) | waiting | heldout | a list of prompt ids",
    "limit": "at most this many prompts",
    "device": "auto (default: what accelerate picks) | cpu",
    "guard": "false: off; true or {patience, min_delta, kl_budget, ema}: on (default: on "
    "when a held-out reward model is used)",
}
DEFAULT_HELDOUT_FRACTION = 0.5


# --- checking params ----------------------------------------------------------------------------

_ANNOTATION_DEFAULTS: dict[str, Any] = {"bool": False, "int": 0, "float": 0.0, "str": ""}


def check_type(name: str, value: Any, default: Any, annotation: str = "") -> Any:
    """Coerce a JSON param to the type of the config field's default, or say what is wrong.

    A field whose default is None takes its type from its annotation ("float | None"). A
    whole float (2.0) passes as an integer: JSON does not tell them apart.
    """
    if value is None:
        return value
    if default is None:
        base = annotation.split("|")[0].strip()
        if base not in _ANNOTATION_DEFAULTS:
            return value
        default = _ANNOTATION_DEFAULTS[base]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InvalidParams(f"parameter {name!r} must be true or false, not {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidParams(f"parameter {name!r} must be a whole number, not {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidParams(f"parameter {name!r} must be a number, not {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise InvalidParams(f"parameter {name!r} must be a string, not {value!r}")
    return value


def config_values(
    cls: type, params: Mapping[str, Any], own: Iterable[str], what: str
) -> dict[str, Any]:
    """The params that are fields of the config dataclass `cls`, type-checked.

    Names that are neither its fields, nor `own` (read by the runner), nor RUNNER_PARAMS
    are refused: a typo must not silently train with a default.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    own = set(own)
    unknown = sorted(set(params) - set(fields) - own - set(RUNNER_PARAMS))
    if unknown:
        known = sorted({*fields, *own})
        raise InvalidParams(
            f"unknown {what} parameter(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )
    return {
        name: check_type(name, params[name], fields[name].default, str(fields[name].type))
        for name in fields
        if name in params
    }


def build(cls: type, values: Mapping[str, Any], what: str) -> Any:
    """`cls(**values)`, its range checks' complaint prefixed with what was being built."""
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise InvalidParams(f"invalid {what} parameters: {exc}") from exc


def int_param(params: Mapping[str, Any], name: str, *, minimum: int = 1) -> int | None:
    """An optional whole-number param (a model id, a limit) of at least `minimum`."""
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidParams(
            f"parameter {name!r} must be a whole number of at least {minimum}, not {value!r}"
        )
    return value


def device_param(params: Mapping[str, Any], kind: str) -> str:
    """The `device` param: a generate job takes auto, cpu, cuda or cuda:N; a ppo job auto or
    cpu, since accelerate places it."""
    value = params.get("device", "auto")
    if kind == PPO:
        if value not in ("auto", "cpu"):
            raise InvalidParams(
                "parameter 'device' of a ppo job must be auto or cpu (accelerate decides)"
            )
        return str(value)
    if not isinstance(value, str) or not (
        value in ("auto", "cpu", "cuda") or value.startswith("cuda:")
    ):
        raise InvalidParams(f"parameter 'device' must be auto, cpu, cuda or cuda:N, not {value!r}")
    return value


def heldout_params(params: Mapping[str, Any]) -> tuple[bool, float]:
    """A reward job's `heldout_split` and `heldout_fraction` (the partner's share of prompts)."""
    split = params.get("heldout_split", False)
    if not isinstance(split, bool):
        raise InvalidParams(f"parameter 'heldout_split' must be true or false, not {split!r}")
    fraction = check_type(
        "heldout_fraction", params.get("heldout_fraction", DEFAULT_HELDOUT_FRACTION), 0.0
    )
    if not 0.0 < fraction < 1.0:
        raise InvalidParams(f"parameter 'heldout_fraction' must be between 0 and 1, not {fraction}")
    return split, fraction


def guard_config(value: Any, has_heldout: bool) -> GuardConfig | None:
    """A ppo job's `guard` param as a GuardConfig, or None for no guard.

    `false` turns it off; `true` or an object of GuardConfig fields turns it on; left out, it
    is on exactly when a held-out reward model scores the rollouts (without one, the "best"
    step would be the luckiest batch of the training reward).
    """
    if value is False or (value is None and not has_heldout):
        return None
    if value is None or value is True:
        return GuardConfig()
    if not isinstance(value, dict):
        raise InvalidParams(f"parameter 'guard' must be true, false or an object, not {value!r}")
    guard: GuardConfig = build(GuardConfig, config_values(GuardConfig, value, (), "guard"), "guard")
    return guard


def _runner_params(params: Mapping[str, Any]) -> None:
    trigger = params.get("trigger")
    if trigger is not None and not isinstance(trigger, str):
        raise InvalidParams(f"parameter 'trigger' must be a string, not {trigger!r}")
    int_param(params, "after_job")
    int_param(params, "fail_after_step", minimum=0)


def check(kind: str, params: Mapping[str, Any]) -> None:
    """Raise InvalidParams unless a `kind` job could start with `params`: known names, right
    types, values in range. What needs the database (does policy 7 exist? which prompts are
    waiting?) or the worker's disk (the backbone) is answered when the job runs.

    `prompts` is checked by the caller (app.services.generation.parse_selection).
    """
    _runner_params(params)
    if kind == REWARD:
        values = config_values(RewardConfig, params, REWARD_RUNNER_PARAMS, REWARD)
        build(RewardConfig, values, REWARD)
        heldout_params(params)
        int_param(params, "snapshot_id")
    elif kind == GENERATE:
        values = config_values(GenerateConfig, params, GENERATE_RUNNER_PARAMS, GENERATE)
        build(GenerateConfig, values, GENERATE)
        for name in ("policy_id", "limit"):
            int_param(params, name)
        device_param(params, GENERATE)
    elif kind == PPO:
        values = config_values(PPOConfig, params, PPO_RUNNER_PARAMS, PPO)
        build(PPOConfig, values, PPO)
        for name in ("reward_model_id", "parent_policy_id", "heldout_reward_model_id", "limit"):
            int_param(params, name)
        device_param(params, PPO)
        guard_config(params.get("guard"), has_heldout=True)
    else:
        raise InvalidParams(f"no params are known for {kind!r} jobs")
