"""Simulated annotators: real accounts labelling through the real HTTP JSON API.

Each one loops `GET /api/v1/projects/{id}/tasks/next` → judge with the documented rule
(app.demo.preference) → `POST /api/v1/tasks/{task_id}/judgments`, exactly as a labelling
client would, with a `client_key` per (annotator, task) so a retried POST is stored once.
When nothing is left (204) it waits and asks again: the loop keeps creating work (the new
policy's pairs) while the annotators are idle. Think time is short and seeded, so the demo's
labelling takes seconds of wall time and almost no CPU next to the trainers.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.demo import preference

IDLE_WAIT_S = 2.0
"""How long an annotator waits after 'nothing left' before asking again."""


@dataclass
class Tally:
    """What one annotator did (read by the demo's progress lines and by tests)."""

    judged: int = 0
    replays: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class SimulatedAnnotator:
    """One annotator: a bearer token, a seeded stream, the prompts' keywords."""

    username: str
    token: str
    base_url: str
    project_id: int
    keywords: Mapping[str, Sequence[str]]
    seed: int = 0
    temperature: float = preference.DEFAULT_TEMPERATURE
    think_s: float = 0.3  # mean pause per judgment (exponential)
    tally: Tally = field(default_factory=Tally)
    rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = preference.annotator_rng(self.seed, self.username)

    def _client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30.0,
        )

    def judge(self, task: dict[str, Any]) -> dict[str, Any]:
        """The judgment body for a leased task (pairwise: a choice; ranking: by score)."""
        external_id = task["prompt"]["external_id"]
        keywords = self.keywords.get(external_id, ())
        candidates = [(c["id"], c["text"]) for c in task["candidates"]]
        if len(candidates) == 2:
            choice = preference.choose(candidates, keywords, self.rng, self.temperature)
            body: dict[str, Any] = {"choice": choice}
        else:  # a ranking project: best first by the rule (no noise needed to be useful)
            ranked = sorted(
                candidates, key=lambda c: preference.score(c[1], keywords).total, reverse=True
            )
            body = {"ranking": [cid for cid, _ in ranked]}
        body["client_key"] = f"demo-{self.username}-{task['task_id']}"
        return body

    def label_once(self, client: httpx.Client) -> bool:
        """Claim and judge one task; False when nothing is left for this annotator."""
        started = time.monotonic()
        resp = client.get(f"/api/v1/projects/{self.project_id}/tasks/next")
        if resp.status_code == 204:
            return False
        resp.raise_for_status()
        task = resp.json()
        body = self.judge(task)
        body["time_spent_ms"] = int((time.monotonic() - started) * 1000)
        posted = client.post(f"/api/v1/tasks/{task['task_id']}/judgments", json=body)
        posted.raise_for_status()
        if posted.status_code == 200:
            self.tally.replays += 1
        else:
            self.tally.judged += 1
        return True

    def run(self, stop: threading.Event, *, until_idle: bool = False) -> Tally:
        """Label until `stop` is set (or, with `until_idle`, until nothing is left)."""
        with self._client() as client:
            while not stop.is_set():
                try:
                    worked = self.label_once(client)
                except httpx.HTTPError as exc:  # the server restarting, a lease lost: go on
                    self.tally.errors.append(f"{type(exc).__name__}: {exc}")
                    worked = False
                if not worked:
                    if until_idle:
                        break
                    stop.wait(IDLE_WAIT_S)
                elif self.think_s > 0:
                    stop.wait(self.rng.expovariate(1.0 / self.think_s))
        return self.tally


def start(
    annotators: Sequence[SimulatedAnnotator],
    stop: threading.Event,
    *,
    on_error: Callable[[str, BaseException], None] | None = None,
) -> list[threading.Thread]:
    """Run each annotator in a daemon thread; returns the threads (join after `stop`)."""

    def target(annotator: SimulatedAnnotator) -> None:
        try:
            annotator.run(stop)
        except BaseException as exc:  # a thread must not die silently
            if on_error is not None:
                on_error(annotator.username, exc)

    threads = [
        threading.Thread(target=target, args=(a,), name=f"annotator-{a.username}", daemon=True)
        for a in annotators
    ]
    for thread in threads:
        thread.start()
    return threads
