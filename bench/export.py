"""Benchmark: export 1,000,000 pair rows from Postgres, against a COPY baseline.

    .venv/bin/python bench/export.py                   # fill (once) and measure
    .venv/bin/python bench/export.py --judgments 100000 --refill

Fills its own database (``prefloop_bench_export``, migrated with Alembic) with a pairwise
project: 250,000 prompts with two completions each and four annotators per task, so
1,000,000 judgments and as many pair rows. The data is generated inside Postgres
(``INSERT … SELECT … generate_series``), so filling takes seconds, and is kept for the next
run unless ``--refill``.

Then, in the same run:

- baseline: ``COPY (SELECT … the same joins, judgment → task → prompt → user → chosen and
  rejected completion, in judgment order …) TO STDOUT`` read through psycopg into a file;
- ``export.stream(shape="pairs")`` as JSONL and as Parquet, each in its own subprocess so
  each peak RSS (``ru_maxrss``) is that format's alone.

It prints rows/s, seconds, peak RSS and the ratio to the baseline. Targets (issue 4): JSONL
at least 50% of COPY's rows/s; peak RSS under 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DB_NAME = "prefloop_bench_export"
ANNOTATORS_PER_TASK = 4

FILL = [
    "INSERT INTO users (username, role, active, created_at) "
    "SELECT 'bench-ann-' || i, 'annotator', true, now() FROM generate_series(1, {annotators}) i",
    "INSERT INTO projects (name, mode, candidates_per_task, judgments_per_task, lease_seconds, "
    "gold_rate, instructions, settings, created_at) "
    "VALUES ('bench', 'pairwise', 2, {annotators}, 300, 0, 'Pick the better answer.', '{{}}', now())",
    # Prompts ~150 characters, metadata like an upload's.
    "INSERT INTO prompts (project_id, external_id, text, metadata, priority, created_at) "
    "SELECT 1, 'p' || i, 'Question ' || i || ': ' || repeat('how would you explain this? ', 5), "
    "json_build_object('split', CASE WHEN i % 10 = 0 THEN 'test' ELSE 'train' END, 'i', i), "
    "0, now() FROM generate_series(1, {prompts}) i",
    # Two completions per prompt, ~300 characters each, from two policies.
    "INSERT INTO completions (prompt_id, text, source, metadata, created_at) "
    "SELECT p.id, 'Answer ' || s.k || ' to ' || p.id || '. ' || repeat('It depends on the context. ', 11), "
    "'policy-' || s.k, '{{}}', now() FROM prompts p CROSS JOIN (VALUES ('a'), ('b')) s(k) "
    "ORDER BY p.id, s.k",
    "INSERT INTO tasks (project_id, prompt_id, completion_ids, required_judgments, judgment_count, "
    "is_gold, priority, state, created_at) "
    "SELECT 1, c.prompt_id, json_build_array(min(c.id), max(c.id)), {annotators}, {annotators}, "
    "false, 0, 'done', now() FROM completions c GROUP BY c.prompt_id ORDER BY c.prompt_id",
    # Each annotator judges each task: a strict verdict, random side, shown in random order.
    "INSERT INTO judgments (project_id, task_id, user_id, ranking, none_acceptable, strength, "
    "rationale, display_order, time_spent_ms, is_gold, created_at) "
    "SELECT 1, t.id, u.id, "
    "CASE WHEN random() < 0.7 THEN json_build_array(json_build_array(t.completion_ids->0), "
    "json_build_array(t.completion_ids->1)) ELSE json_build_array(json_build_array("
    "t.completion_ids->1), json_build_array(t.completion_ids->0)) END, false, "
    "CASE WHEN random() < 0.5 THEN 1 + floor(random() * 3)::int END, NULL, "
    "CASE WHEN random() < 0.5 THEN t.completion_ids ELSE json_build_array(t.completion_ids->1, "
    "t.completion_ids->0) END, 2000 + floor(random() * 20000)::int, false, "
    "timestamptz '2024-05-01' + (t.id * interval '1 second') "
    "FROM tasks t CROSS JOIN users u ORDER BY t.id, u.id",
    "ANALYZE",
]

# The same rows the pairs export reads (pairwise: chosen = first group, rejected = second).
BASELINE = """
COPY (
  SELECT p.text AS prompt, p.messages AS prompt_messages, cw.text AS chosen, cl.text AS rejected,
         coalesce(j.strength, 1) AS margin, false AS tie, p.external_id AS prompt_id,
         cw.id AS chosen_id, cl.id AS rejected_id, j.task_id, j.id AS judgment_id,
         u.username AS annotator, j.strength, 1 AS rank_distance, j.created_at, p.metadata
  FROM judgments j
  JOIN tasks t ON t.id = j.task_id
  JOIN prompts p ON p.id = t.prompt_id
  JOIN users u ON u.id = j.user_id
  JOIN completions cw ON cw.id = (j.ranking->0->>0)::bigint
  JOIN completions cl ON cl.id = (j.ranking->1->>0)::bigint
  WHERE j.project_id = 1 AND NOT j.none_acceptable AND json_array_length(j.ranking) = 2
  ORDER BY j.id
) TO STDOUT
"""


def _url() -> str:
    from tests.conftest import pg_url

    return pg_url(DB_NAME)


def _psycopg_url() -> str:
    return _url().replace("postgresql+psycopg://", "postgresql://")


def fill(judgments: int) -> None:
    """A fresh, migrated database holding `judgments` judgments (4 per task)."""
    import psycopg
    from alembic import command

    from app.cli import alembic_config
    from tests.conftest import recreate_pg_database

    url = recreate_pg_database(DB_NAME)
    cfg = alembic_config(url)
    cfg.attributes["configure_logger"] = False
    command.upgrade(cfg, "head")
    prompts = judgments // ANNOTATORS_PER_TASK
    with psycopg.connect(_psycopg_url(), autocommit=True) as conn:
        for statement in FILL:
            started = time.perf_counter()
            conn.execute(statement.format(annotators=ANNOTATORS_PER_TASK, prompts=prompts))
            what = statement.split()[2] if statement.startswith("INSERT") else statement
            print(f"  fill: {what:<12} {time.perf_counter() - started:6.1f} s")


def count_judgments() -> int:
    import psycopg

    try:
        with psycopg.connect(_psycopg_url()) as conn:
            row = conn.execute("SELECT count(*) FROM judgments").fetchone()
            return int(row[0]) if row else 0
    except psycopg.OperationalError:
        return 0


def baseline(out: Path) -> dict[str, float]:
    """COPY of the same join into a file; rows counted from the text format's lines."""
    import psycopg

    started = time.perf_counter()
    rows = 0
    with (
        psycopg.connect(_psycopg_url()) as conn,
        conn.cursor() as cur,
        out.open("wb") as fh,
        cur.copy(BASELINE) as copy,
    ):
        for block in copy:
            fh.write(block)
            rows += bytes(block).count(b"\n")
    seconds = time.perf_counter() - started
    return {"rows": rows, "seconds": seconds, "bytes": out.stat().st_size}


def child(fmt: str, out: Path) -> None:
    """One export in this process; prints its figures as JSON on the last line."""
    from app.db import make_engine, make_sessionmaker
    from app.services import export
    from app.settings import Settings

    settings = Settings(database_url=_url())
    factory = make_sessionmaker(make_engine(settings))
    started, cpu = time.perf_counter(), time.process_time()
    with out.open("wb") as fh:
        for chunk in export.stream(factory, 1, shape="pairs", fmt=fmt, filters={}):
            fh.write(chunk)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    if fmt == "jsonl":
        with out.open("rb") as fh:
            rows = sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))
    else:
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(out).metadata.num_rows
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "rows": rows,
                "seconds": seconds,
                "cpu": cpu,
                "bytes": out.stat().st_size,
                "peak_mb": peak_kb / 1024,
            }
        )
    )


def settle() -> None:
    """Flush the previous phase's file to disk before the next is timed, so no phase pays
    for another's writeback (the files are about a gigabyte each)."""
    os.sync()
    time.sleep(2)


def run_child(fmt: str, out: Path) -> dict[str, float]:
    settle()
    done = subprocess.run(
        [sys.executable, __file__, "--child", fmt, "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--judgments", type=int, default=1_000_000)
    parser.add_argument("--refill", action="store_true", help="rebuild the database")
    parser.add_argument("--formats", default="jsonl,parquet")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/prefloop-bench-export"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.out)
        return

    args.dir.mkdir(parents=True, exist_ok=True)
    have = count_judgments()
    if args.refill or have != args.judgments:
        print(f"filling {DB_NAME} with {args.judgments:,} judgments …")
        fill(args.judgments)
    else:
        print(f"reusing {DB_NAME} ({have:,} judgments; --refill to rebuild)")

    settle()
    base = baseline(args.dir / "baseline.copy")
    base_rate = base["rows"] / base["seconds"]
    header = f"{'what':<10} {'rows':>10} {'seconds':>8} {'CPU s':>6} {'rows/s':>10} {'MB out':>8}"
    print(f"\n{header} {'peak RSS':>9} {'vs COPY':>8}")
    print(
        f"{'COPY':<10} {base['rows']:>10,} {base['seconds']:>8.1f} {'':>6} {base_rate:>10,.0f} "
        f"{base['bytes'] / 1e6:>8.0f} {'':>9} {1:>8.2f}"
    )
    for fmt in args.formats.split(","):
        result = run_child(fmt, args.dir / f"pairs.{fmt}")
        rate = result["rows"] / result["seconds"]
        print(
            f"{fmt:<10} {result['rows']:>10,} {result['seconds']:>8.1f} {result['cpu']:>6.1f} "
            f"{rate:>10,.0f} "
            f"{result['bytes'] / 1e6:>8.0f} {result['peak_mb']:>7.0f}MB {rate / base_rate:>8.2f}"
        )
        if result["rows"] != base["rows"]:
            print(f"  warning: {fmt} wrote {result['rows']:,} rows, COPY {base['rows']:,}")


if __name__ == "__main__":
    main()
