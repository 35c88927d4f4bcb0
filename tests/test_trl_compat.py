"""A `pairs` export goes into TRL's RewardTrainer and DPOTrainer unchanged.

The file is exported from a real (SQLite) database, loaded with `datasets` exactly as the
export page says, and trained on for two steps with tiny models built from a config and a
tokenizer built locally (no Hub). The loss must be finite.
"""

from __future__ import annotations

import math
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker, transaction
from app.models import ProjectMode, Role
from app.services import export
from tests.conftest import migrated_settings
from tests.factories import make_project, make_prompt, make_task, make_user
from tests.test_export import judge

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A labeled project in its own SQLite database: pairwise with strength, a chat prompt,
    metadata of different shapes, and a ranking task; exported as JSONL and as hf."""
    tmp = tmp_path_factory.mktemp("trl")
    settings = migrated_settings("sqlite", tmp, "trl")
    engine = make_engine(settings)
    factory: sessionmaker[Session] = make_sessionmaker(engine)
    with transaction(factory) as s:
        pairwise = make_project(s, name="trl-pairs")
        ann = make_user(s, Role.annotator, username="trl-ann")
        for i in range(6):
            p = make_prompt(
                s,
                pairwise,
                [f"a kind helpful answer number {i}", f"a rude short reply {i}"],
                text=f"please help me with question {i}",
                metadata_={"topic": "help", "i": i} if i % 2 else {"lang": "en"},
            )
            task = make_task(s, pairwise, p)
            good, bad = task.completion_ids
            judge(s, task, ann, [[good], [bad]], strength=(i % 3) + 1)
        chat = make_prompt(
            s,
            pairwise,
            ["hello friend", "go away"],
            text=None,
            messages=[{"role": "user", "content": "say hi"}],
        )
        task = make_task(s, pairwise, chat)
        judge(s, task, ann, [[task.completion_ids[0]], [task.completion_ids[1]]])
        ranked = make_project(s, name="trl-ranked", mode=ProjectMode.ranking, candidates_per_task=3)
        p = make_prompt(s, ranked, ["best answer", "middle answer", "worst answer"], text="rank us")
        task = make_task(s, ranked, p)
        judge(s, task, ann, [[c] for c in task.completion_ids])
        ids = (pairwise.id, ranked.id)
    files = {}
    for project_id in ids:
        path = tmp / f"project-{project_id}-pairs.jsonl"
        path.write_bytes(
            b"".join(export.stream(factory, project_id, shape="pairs", fmt="jsonl", filters={}))
        )
        files[project_id] = path
    archive = tmp / "pairs.tar.gz"
    archive.write_bytes(
        b"".join(export.stream(factory, ids[0], shape="pairs", fmt="hf", filters={}))
    )
    with tarfile.open(archive) as tar:
        tar.extractall(tmp / "hf", filter="data")
    yield {
        "jsonl": files[ids[0]],
        "ranked": files[ids[1]],
        "hf": tmp / "hf" / f"project-{ids[0]}-pairs",
        "tmp": tmp,
    }
    engine.dispose()


def _load(exported: dict[str, Any]) -> Any:
    ds = datasets.load_dataset(
        "json",
        data_files=[str(exported["jsonl"]), str(exported["ranked"])],
        split="train",
        cache_dir=str(exported["tmp"] / "cache"),
    )
    assert ds.num_rows == 7 + 3  # 7 pairwise judgments, and C(3, 2) pairs from the ranking
    assert ds.column_names == list(export.COLUMNS["pairs"])
    return ds


def _tokenizer_and_words(ds: Any) -> Any:
    from worker.models import tiny_tokenizer

    words = sorted(
        {w.lower() for row in ds for k in ("prompt", "chosen", "rejected") for w in row[k].split()}
    )
    return tiny_tokenizer(words, kind="causal")


def _finite_losses(trainer: Any) -> list[float]:
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses, trainer.state.log_history
    assert all(math.isfinite(x) for x in losses)
    return losses


def _common_args() -> dict[str, Any]:
    return {
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "max_length": 64,
    }


def test_reward_trainer_trains_on_the_export(exported: dict[str, Any], tmp_path: Path) -> None:
    from worker.models import tiny_reward_model

    ds = _load(exported)
    assert sorted(set(ds["margin"])) == [1, 2, 3]  # strengths 1-3, and rank distances 1-2
    tokenizer = _tokenizer_and_words(ds)
    model = tiny_reward_model(len(tokenizer), seed=0, kind="causal")
    trainer = trl.RewardTrainer(
        model=model,
        args=trl.RewardConfig(output_dir=str(tmp_path / "rm"), **_common_args()),
        train_dataset=ds,
        processing_class=tokenizer,
    )
    _finite_losses(trainer)


def test_dpo_trainer_trains_on_the_export(exported: dict[str, Any], tmp_path: Path) -> None:
    from worker.models import tiny_causal_lm

    ds = _load(exported)
    tokenizer = _tokenizer_and_words(ds)
    model = tiny_causal_lm(len(tokenizer), seed=0)
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=tiny_causal_lm(len(tokenizer), seed=0),  # no Hub path to copy it from
        args=trl.DPOConfig(output_dir=str(tmp_path / "dpo"), **_common_args()),
        train_dataset=ds,
        processing_class=tokenizer,
    )
    _finite_losses(trainer)


def test_hf_directory_loads_and_trains(exported: dict[str, Any], tmp_path: Path) -> None:
    """The `hf` format opens with `load_from_disk` and feeds the reward trainer as it is."""
    from worker.models import tiny_reward_model

    ds = datasets.load_from_disk(str(exported["hf"]))
    assert ds.num_rows == 7
    assert ds.column_names == list(export.COLUMNS["pairs"])
    assert ds[0]["chosen"] == "a kind helpful answer number 0"
    tokenizer = _tokenizer_and_words(ds)
    trainer = trl.RewardTrainer(
        model=tiny_reward_model(len(tokenizer), seed=1, kind="causal"),
        args=trl.RewardConfig(output_dir=str(tmp_path / "rm-hf"), **_common_args()),
        train_dataset=ds,
        processing_class=tokenizer,
    )
    _finite_losses(trainer)
