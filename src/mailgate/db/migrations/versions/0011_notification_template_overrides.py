"""notification template overrides: a scope's own subject, text and HTML of a built-in kind

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 18:10:02.596209
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "template_overrides",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("scope", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=True),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("locale", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("html", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_template_overrides_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_template_overrides")),
        sa.UniqueConstraint("scope", "name", "locale", name=op.f("uq_template_overrides_scope_name_locale")),
    )
    op.create_index(op.f("ix_template_overrides_tenant_id"), "template_overrides", ["tenant_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_template_overrides_tenant_id"), table_name="template_overrides")
    op.drop_table("template_overrides")
