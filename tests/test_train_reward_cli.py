"""The offline trainer (`python -m worker.train_reward_cli`) on a real `pairs` export.

It must train as the job queue does on the same judgments: the export's `margin` column
(the strength, written for TRL) is no margin unless asked for, and tied pairs are ties. It
refuses an existing OUT_DIR before loading anything, prints the held-out metrics, and keeps
transformers' report of the new score head out of its progress bar.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
)

from app.db import make_engine, make_sessionmaker, transaction
from app.models import Role
from app.services import export
from tests.conftest import migrated_settings
from tests.factories import make_project, make_prompt, make_task, make_user
from tests.test_export import judge
from worker import train_reward_cli
from worker.models import (
    METADATA_FILE,
    is_new_head_report,
    load_reward_backbone,
    tiny_reward_model,
    tiny_tokenizer,
)
from worker.reward import RewardConfig, pair_margin

ROOT = Path(__file__).resolve().parent.parent
FILLER = [f"w{i}" for i in range(30)]
WORDS = [*FILLER, "good", "bad"]
TINY = ["--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--set", "max_length=48"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`prefloop export --shape pairs --ties` of a labeled project in its own SQLite database:
    60 pairwise judgments where "good" beats "bad", strengths 1, 2 and 3, and 4 ties."""
    tmp = tmp_path_factory.mktemp("offline")
    engine = make_engine(migrated_settings("sqlite", tmp, "offline"))
    factory: sessionmaker[Session] = make_sessionmaker(engine)
    rng = random.Random(0)

    def text(marker: str) -> str:
        words = rng.choices(FILLER, k=rng.randint(2, 6))
        words.insert(rng.randint(0, len(words)), marker)
        return " ".join(words)

    with transaction(factory) as s:
        project = make_project(s, name="offline")
        annotator = make_user(s, Role.annotator, username="offline-ann")
        for i in range(64):
            prompt = make_prompt(
                s, project, [text("good"), text("bad")], text=" ".join(rng.choices(FILLER, k=3))
            )
            task = make_task(s, project, prompt)
            good, bad = task.completion_ids
            ranking = [[good, bad]] if i % 16 == 15 else [[good], [bad]]
            judge(s, task, annotator, ranking, strength=None if i % 16 == 15 else i % 3 + 1)
        project_id = project.id
    path = tmp / "pairs.jsonl"
    path.write_bytes(
        b"".join(
            export.stream(factory, project_id, shape="pairs", fmt="jsonl", filters={}, ties=True)
        )
    )
    engine.dispose()
    yield path


@pytest.fixture(scope="module")
def headless(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT saved without a classification head, as MiniLM ships: loading it as a
    reward model adds a new score head (transformers reports it MISSING)."""
    path = tmp_path_factory.mktemp("headless") / "backbone"
    tokenizer = tiny_tokenizer(WORDS)
    model = tiny_reward_model(len(tokenizer), seed=0)
    assert isinstance(model, BertForSequenceClassification)
    model.bert.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_offline(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """Train in this process; the JSON summary it printed last."""
    assert train_reward_cli.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_margin_column_is_no_margin_unless_asked(pairs_file: Path) -> None:
    rows: list[dict[str, Any]] = train_reward_cli.read_pairs(pairs_file)
    strict = [r for r in rows if not r["tie"]]
    assert len(rows) == 64 and len(strict) == 60
    assert {r["margin"] for r in strict} == {1, 2, 3}  # the strength, as TRL reads it

    in_app = RewardConfig()  # the job queue's default: margin_from_strength=False
    default = train_reward_cli.groups_from_export(rows)
    assert [pair_margin(g, in_app) for g in default] == [0.0] * 64
    assert [g.ranking for g in default] == [[[0, 1]] if r["tie"] else [[0], [1]] for r in rows]
    assert [g.strength for g in default] == [r["strength"] for r in rows]

    as_trl = train_reward_cli.groups_from_export(rows, margin_column=True)
    assert [pair_margin(g, in_app) for g in as_trl] == [
        0.0 if r["tie"] else float(r["margin"]) for r in rows
    ]

    parser = train_reward_cli.parser()
    from_strength = train_reward_cli.config_from_args(
        parser.parse_args(["pairs.jsonl", "out", "--margin-from-strength"])
    )
    assert from_strength.margin_from_strength is True
    assert [pair_margin(g, from_strength) for g in default] == [
        0.0 if r["strength"] is None else 0.5 * (r["strength"] - 1) for r in rows
    ]
    with pytest.raises(SystemExit):
        parser.parse_args(["p", "o", "--margin-column", "--margin-from-strength"])


def test_offline_run_ignores_the_margin_column_and_prints_held_out_metrics(
    pairs_file: Path, headless: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    no_margin_file = tmp_path / "no-margin.jsonl"
    no_margin_file.write_text(
        "".join(
            json.dumps({k: v for k, v in row.items() if k != "margin"}) + "\n"
            for row in train_reward_cli.read_pairs(pairs_file)
        )
    )
    common = ["--backbone", str(headless), *TINY, "--set", "eval_fraction=0.25"]

    default = run_offline([str(pairs_file), str(tmp_path / "a"), *common], capsys)
    without_column = run_offline([str(no_margin_file), str(tmp_path / "b"), *common], capsys)
    with_column = run_offline(
        [str(pairs_file), str(tmp_path / "c"), *common, "--margin-column"], capsys
    )

    held_out = default["eval"]
    assert set(held_out) == {"accuracy", "loss", "ece", "pairs"}
    saved = json.loads((tmp_path / "a" / METADATA_FILE).read_text())["metrics"]["eval"]
    assert held_out == {key: saved[key] for key in held_out}
    assert held_out["pairs"] > 0 and 0.0 <= held_out["accuracy"] <= 1.0
    # The margin column changes nothing unless asked for; asked for, it changes the loss.
    assert without_column["eval"] == held_out
    assert with_column["eval"]["loss"] != held_out["loss"]


def test_an_existing_out_dir_fails_before_anything_loads(pairs_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "reward-1"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier run")
    code = (
        "import sys\n"
        "from worker import train_reward_cli\n"
        "try:\n"
        f"    train_reward_cli.main([{str(pairs_file)!r}, {str(out)!r}, '--backbone', 'nowhere'])\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip() == "exit 2 False False", proc.stdout + proc.stderr
    assert f"{out} already exists; checkpoints are never overwritten" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reward-1"]  # no temp directory


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log() -> Iterator[Records]:
    """What reaches transformers' own log handler (after the loggers' filters)."""
    records = Records()
    root = logging.getLogger("transformers")
    root.addHandler(records)
    yield records
    root.removeHandler(records)


def test_only_the_new_head_report_is_silenced(
    headless: Path, tmp_path: Path, transformers_log: Records
) -> None:
    """Loading a base model as a reward model reports its new head as MISSING; the worker's
    loader (load_reward_backbone) drops exactly that report, and still shows one with
    anything else amiss."""
    AutoModelForSequenceClassification.from_pretrained(headless, num_labels=1)
    reports = [m for m in transformers_log.messages if "LOAD REPORT" in m]  # what it would say
    assert len(reports) == 1 and is_new_head_report(reports[0])
    transformers_log.messages.clear()

    load_reward_backbone(str(headless))
    assert not [m for m in transformers_log.messages if "LOAD REPORT" in m]

    # A checkpoint with something else amiss (here an MLM head nobody loads) still reports.
    masked = tmp_path / "masked"
    tokenizer = tiny_tokenizer(WORDS)
    config = tiny_reward_model(len(tokenizer), seed=0).config
    assert isinstance(config, BertConfig)
    BertForMaskedLM(config).save_pretrained(masked)
    tokenizer.save_pretrained(masked)
    load_reward_backbone(str(masked))
    reports = [m for m in transformers_log.messages if "LOAD REPORT" in m]
    assert len(reports) == 1 and "UNEXPECTED" in reports[0] and "MISSING" in reports[0]


def test_the_command_prints_no_load_report(
    pairs_file: Path, headless: Path, tmp_path: Path
) -> None:
    out = tmp_path / "reward"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.train_reward_cli",
            str(pairs_file),
            str(out),
            "--backbone",
            str(headless),
            *TINY,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOAD REPORT" not in proc.stderr and "MISSING" not in proc.stderr, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["eval"]["pairs"] > 0 and summary["num_processes"] == 1
    assert (out / "config.json").exists()
