"""Dependency direction: the web app never imports torch, transformers or the worker."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"torch", "transformers", "accelerate", "peft", "worker", "trl"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_app_sources_import_no_ml_or_worker_code():
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & FORBIDDEN)
        for p in (ROOT / "app").rglob("*.py")
        if _imports(p) & FORBIDDEN
    }
    assert offenders == {}


def test_creating_the_app_loads_no_torch():
    code = (
        "import sys; from app.main import create_app; from app.settings import Settings;"
        "create_app(Settings(database_url='sqlite:///:memory:'));"
        "bad = [m for m in ('torch', 'transformers', 'worker') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_routes_never_write_rows_directly():
    """Routes parse and render; services own every write."""
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "app" / "routes").glob("*.py")
        if any(
            s in p.read_text() for s in ("session.add(", "db.add(", ".delete(", "db.execute(insert")
        )
    ]
    assert offenders == []
