"""Score completions with a saved reward model, JSON in and out, for the web process.

    echo '{"prompt": "...", "completions": ["...", "..."]}' | python -m worker.score_cli MODEL_DIR
    {"scores": [1.25, -0.5]}

The web app never imports torch (DESIGN.md); it runs this module as a subprocess instead
(app/services/model_registry.py). Exit status: 0 ok, 2 bad input, 3 the worker extra
(torch, transformers) is not installed, 1 anything else, with the reason on stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_MISSING_EXTRA = 3  # app.services.model_registry.EXIT_MISSING_EXTRA


def _read_request(raw: str) -> tuple[str, list[str]]:
    request = json.loads(raw)
    prompt, completions = request.get("prompt"), request.get("completions")
    if not isinstance(prompt, str):
        raise ValueError("'prompt' must be a string")
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        raise ValueError("'completions' must be a list of strings")
    return prompt, completions


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m worker.score_cli MODEL_DIR < request.json", file=sys.stderr)
        return EXIT_BAD_INPUT
    model_dir = Path(args[0])
    try:
        prompt, completions = _read_request(sys.stdin.read())
    except (ValueError, AttributeError) as exc:
        print(f"bad request: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not model_dir.is_dir():
        print(f"no model directory {model_dir}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        from worker.reward import score
    except ImportError as exc:
        print(f"the worker extra is not installed: {exc}", file=sys.stderr)
        return EXIT_MISSING_EXTRA
    scores = score(model_dir, prompt, completions) if completions else []
    json.dump({"scores": [float(s) for s in scores]}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
