"""lean lease indexes: drop ix_leases_expires_at and the redundant ix_leases_task_id

Leases are inserted and deleted on every judgment, and there are never more live ones than
annotators at work, so every index on them is paid for on each claim and judgment. Two did
not earn it:

- ix_leases_expires_at: with the table's statistics stale (always, under this churn) the
  planner combined it with the task index in a BitmapAnd for the claim's live-lease count,
  reading thousands of dead index entries per candidate task: 33 ms of a claim's candidate
  statement instead of under 1 (bench/annotate.py, paced phase). Every query on expires_at
  also names a task, a user or a project, which have their own indexes.
- ix_leases_task_id: uq_leases_task_id (task_id, user_id) already starts with task_id.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_leases_expires_at"))
        batch_op.drop_index(batch_op.f("ix_leases_task_id"))


def downgrade() -> None:
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_leases_task_id"), ["task_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_leases_expires_at"), ["expires_at"], unique=False)
