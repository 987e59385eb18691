"""stored mail server documents brought within the bounds of issue 18

Numbers a document may no longer hold (waits longer than 120 s to connect or 600 s for a reply,
quotas past their caps) are lowered to the cap, and a tenant's `smtp.ca_file` (a path on
mailgate's machine, now only the global server's to name) is dropped: the tenant's admin gives
the CA as `ca_certificate` instead, and until then the certificate check says so. A changed
server gets a new version, so nothing made with its old settings is reused.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 16:40:00
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The caps of src/mailgate/settings/document.py when this migration was written (a migration
# keeps its own copy: later changes to the document must not change what it did).
CAPS = {
    "connection": {"check_idle_after": 3600, "max_idle": 3600, "connect_timeout": 120, "protocol_timeout": 600,
                   "token_expiry_margin": 3000, "max_messages_per_connection": 1_000_000, "pool_size": 1000},
    "quota": {"messages_per_minute": 1_000_000, "recipients_per_day": 1_000_000_000,
              "max_concurrent_connections": 1000},
}  # fmt: skip

servers = sa.table(
    "mail_servers",
    sa.column("id", sa.BigInteger),
    sa.column("scope", sa.String),
    sa.column("document", sa.JSON),
    sa.column("version", sa.Integer),
    sa.column("updated_by", sa.String),
)


def within_bounds(scope: str, document: dict[str, Any]) -> dict[str, Any] | None:
    """The document within the caps, or None when it is already."""
    changed = False
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in document.items()}
    for section, caps in CAPS.items():
        values = out.get(section)
        if not isinstance(values, dict):
            continue
        for name, cap in caps.items():
            value = values.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > cap:
                values[name] = type(value)(cap)
                changed = True
    smtp = out.get("smtp")
    if scope != "global" and isinstance(smtp, dict) and smtp.get("ca_file") is not None:
        smtp.pop("ca_file")
        changed = True
    return out if changed else None


def upgrade() -> None:
    conn = op.get_bind()
    for row in conn.execute(sa.select(servers.c.id, servers.c.scope, servers.c.document, servers.c.version)).all():
        document = within_bounds(row.scope, row.document or {})
        if document is not None:
            conn.execute(
                servers.update()
                .where(servers.c.id == row.id)
                .values(document=document, version=row.version + 1, updated_by="mailgate upgrade (0009)")
            )


def downgrade() -> None:
    pass  # the lowered values are valid before this revision too
