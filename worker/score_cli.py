"""Score completions with a saved reward model, JSON in and out, for the web process.

One shot (loads torch and the model, scores once, exits):

    echo '{"prompt": "...", "completions": ["...", "..."]}' | python -m worker.score_cli MODEL_DIR
    {"scores": [1.25, -0.5]}

Exit status: 0 ok, 2 bad input, 3 the worker extra (torch, transformers) is not installed,
1 anything else, with the reason on stderr.

Serve (what the web process runs, once, and reuses: app/services/model_registry.py):

    python -m worker.score_cli --serve [--idle-exit-s 600] [--cache-size 2] [--device cpu]
                                       [--threads N]

reads one JSON request per line on stdin, ``{"model_dir": ..., "prompt": ..., "completions":
[...]}``, and answers each with one line on stdout: ``{"scores": [...]}`` or ``{"error": ...,
"status": "bad_input" | "missing_extra" | "failed"}``. Importing torch and loading a model
take seconds, scoring a few completions milliseconds, so the loaded models are kept, the
`--cache-size` most recently used ones (memory stays bounded). A bad request gets an error
line, never the end of the process. It exits with status 0 when stdin closes (the web
process ended) or after `--idle-exit-s` seconds without a request (the memory goes back).

The web app never imports torch (DESIGN.md); it runs this module as a subprocess instead.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import traceback
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.reward import RewardScorer

EXIT_BAD_INPUT = 2
EXIT_MISSING_EXTRA = 3
IDLE_EXIT_S = 600.0
CACHE_SIZE = 2

# Serve-mode answer statuses (app.services.model_registry maps them to HTTP errors).
BAD_INPUT = "bad_input"
"""The request is malformed or names no model directory: the client's mistake."""
MISSING_EXTRA = "missing_extra"
"""torch/transformers cannot be imported in this interpreter."""
FAILED = "failed"
"""Loading the model or scoring raised; the message says why."""


def _read_request(raw: str | bytes) -> tuple[str, list[str]]:
    return _fields(json.loads(raw))


def _fields(request: Any) -> tuple[str, list[str]]:
    prompt, completions = request.get("prompt"), request.get("completions")
    if not isinstance(prompt, str):
        raise ValueError("'prompt' must be a string")
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        raise ValueError("'completions' must be a list of strings")
    return prompt, completions


def _one_shot(model_dir: Path) -> int:
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


# Serve mode ------------------------------------------------------------------------------------


def _identity(model_dir: Path) -> tuple[tuple[str, int, int], ...]:
    """What a directory's files look like now (name, size, mtime): a model saved again into
    the same path (`save_atomic` swaps the directory) is loaded again, not served stale."""
    return tuple(
        sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(model_dir))
    )


class LoadedModels:
    """The `size` most recently used RewardScorers, by resolved model directory."""

    def __init__(self, size: int, device: str, threads: int | None = None) -> None:
        self.size = max(1, size)
        self.device = device
        self.threads = threads
        self._loaded: OrderedDict[Path, tuple[Any, RewardScorer]] = OrderedDict()

    def get(self, model_dir: Path) -> RewardScorer:
        """Raises ImportError when the worker extra is missing (before touching the model)."""
        import torch

        from worker.reward import RewardScorer

        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        key, identity = model_dir.resolve(), _identity(model_dir)
        cached = self._loaded.get(key)
        if cached is not None and cached[0] == identity:
            self._loaded.move_to_end(key)
            return cached[1]
        self._loaded.pop(key, None)  # stale: free it before loading the new one
        while len(self._loaded) >= self.size:
            self._loaded.popitem(last=False)
        scorer = RewardScorer.load(model_dir, self.device)
        self._loaded[key] = (identity, scorer)
        return scorer


def answer(raw: bytes, models: LoadedModels) -> dict[str, Any]:
    """The response to one request line. Never raises: one bad request must not end the
    process that every later request of the web server depends on."""
    try:
        request = json.loads(raw)
        model_dir = request.get("model_dir")
        if not isinstance(model_dir, str) or not model_dir:
            raise ValueError("'model_dir' must be a non-empty string")
        prompt, completions = _fields(request)
    except (ValueError, AttributeError) as exc:  # JSONDecodeError, UnicodeDecodeError included
        return {"error": f"bad request: {exc}", "status": BAD_INPUT}
    directory = Path(model_dir)
    if not directory.is_dir():
        return {"error": f"no model directory {directory}", "status": BAD_INPUT}
    if not completions:
        return {"scores": []}
    try:
        import worker.reward  # noqa: F401  (import errors of the extra, not of a model's code)
    except ImportError as exc:
        return {"error": f"the worker extra is not installed: {exc}", "status": MISSING_EXTRA}
    try:
        scorer = models.get(directory)
        scores = scorer(prompt, completions)
    except Exception as exc:  # a broken model directory, an odd input: report, keep serving
        traceback.print_exc(file=sys.stderr)
        return {"error": f"{type(exc).__name__}: {exc}", "status": FAILED}
    return {"scores": [float(s) for s in scores]}


def _request_lines(fd: int, idle_exit_s: float) -> Iterator[bytes]:
    """Lines from `fd` until it closes or nothing arrives for `idle_exit_s` seconds.

    Reads the descriptor directly (select + os.read) rather than through a buffered file, so
    select never says "nothing to read" while a line already sits in a buffer.
    """
    pending = b""
    while True:
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line.strip():
                yield line
        ready, _, _ = select.select([fd], [], [], idle_exit_s)
        if not ready:
            return  # idle: give the memory back; the web process starts a new one on demand
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            if pending.strip():
                yield pending
            return
        pending += chunk


def serve(
    idle_exit_s: float = IDLE_EXIT_S,
    cache_size: int = CACHE_SIZE,
    device: str = "cpu",
    threads: int | None = None,
) -> int:
    # Answers go to a private copy of stdout; fd 1 becomes stderr, so a library that prints
    # can never write into the protocol.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    models = LoadedModels(cache_size, device, threads)
    for line in _request_lines(sys.stdin.fileno(), idle_exit_s):
        out.write(json.dumps(answer(line, models)) + "\n")
        out.flush()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker.score_cli",
        description="Score completions with a saved reward model (JSON on stdin and stdout).",
    )
    parser.add_argument("model_dir", nargs="?", type=Path, help="one shot: score one request")
    parser.add_argument("--serve", action="store_true", help="answer one request per line")
    parser.add_argument("--idle-exit-s", type=float, default=IDLE_EXIT_S)
    parser.add_argument("--cache-size", type=int, default=CACHE_SIZE, help="models kept loaded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)  # bad flags: exit 2
    if args.serve == (args.model_dir is not None):
        print(
            "usage: python -m worker.score_cli MODEL_DIR < request.json\n"
            "       python -m worker.score_cli --serve [--idle-exit-s S] [--cache-size N]",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    if args.serve:
        return serve(args.idle_exit_s, args.cache_size, args.device, args.threads)
    return _one_shot(args.model_dir)


if __name__ == "__main__":
    sys.exit(main())
