"""repairs and repair_deltas: cause identification and treatment jobs, and the deltas they apply
on top of calibrations

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "repairs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id"), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("apply", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("reverted_edits", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_repairs_status", "repairs", ["status"])
    op.create_index("ix_repairs_created_at", "repairs", ["created_at"])
    op.create_table(
        "repair_deltas",
        sa.Column("repair_id", sa.String(36), sa.ForeignKey("repairs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("calibration_id", sa.String(36), sa.ForeignKey("calibrations.id"), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("repair_deltas")
    op.drop_index("ix_repairs_created_at", table_name="repairs")
    op.drop_index("ix_repairs_status", table_name="repairs")
    op.drop_table("repairs")
