"""API input and output models (pydantic). One section per feature; keep sections apart."""

from __future__ import annotations

# --- projects and prompts ---------------------------------------------------------------

# --- labeling: tasks and judgments ------------------------------------------------------

# --- export -----------------------------------------------------------------------------
