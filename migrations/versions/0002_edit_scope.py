"""edits.scope: which queries about its subject an edit serves ("fact" or "subject")

Existing rows become "fact", the behaviour they were created with. The relation keys need no
column: they travel in edit_keys.vectors as a second safetensors tensor.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("edits", sa.Column("scope", sa.String(16), nullable=False, server_default="fact"))


def downgrade() -> None:
    with op.batch_alter_table("edits") as batch:
        batch.drop_column("scope")
