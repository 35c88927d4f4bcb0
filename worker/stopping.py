"""How a trainer is told to stop between steps (torch-free, so anything may import it)."""

from __future__ import annotations


class Interrupted(Exception):
    """Training stopped between steps because the worker was told to stop.

    `save` says whether the trainer should leave a resume checkpoint first: yes when this
    worker is shutting down and the job goes back to the queue, no when the job was
    cancelled or taken over by another worker (which may be writing its own).
    """

    def __init__(self, message: str, *, save: bool = False) -> None:
        super().__init__(message)
        self.save = save
