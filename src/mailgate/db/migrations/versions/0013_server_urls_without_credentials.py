"""stored mail server documents' URLs without a user name or password

A URL field (a token source's token_url, authority and authorize_url; graph.authority and
graph.endpoint; ews.url) may no longer hold user:password@ or user@: httpx sends them as Basic
credentials of their own, in place of the Authorization mailgate sets. A stored URL that holds
them loses them (https://user:pass@host/x becomes https://host/x), so the document still loads;
mailgate sends its own credentials there, as the document's secret fields say. A changed server
gets a new version, so nothing made with its old settings is reused.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 08:10:00
"""

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The URL fields of src/mailgate/settings/document.py when this migration was written (a
# migration keeps its own copy: later changes to the document must not change what it did).
URL_FIELDS = (
    ("auth", "token", "token_url"), ("auth", "token", "authority"), ("auth", "token", "authorize_url"),
    ("graph", "authority"), ("graph", "endpoint"), ("ews", "url"),
)  # fmt: skip

servers = sa.table(
    "mail_servers",
    sa.column("id", sa.BigInteger),
    sa.column("document", sa.JSON),
    sa.column("version", sa.Integer),
    sa.column("updated_by", sa.String),
)


def without_userinfo(url: str) -> str:
    """`url` without user:password@ (or user@) before its host; as it is when it has none, or
    is not a URL."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return url
    if "@" not in netloc:
        return url
    return url.replace("//" + netloc, "//" + netloc.rpartition("@")[2], 1)


def without_credentials(document: dict[str, Any]) -> dict[str, Any] | None:
    """The document with its URLs' user names and passwords taken out, or None when it has none."""
    changed = False
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in document.items()}
    auth = out.get("auth")
    if isinstance(auth, dict) and isinstance(auth.get("token"), dict):
        auth["token"] = dict(auth["token"])
    for *parents, name in URL_FIELDS:
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        value = node.get(name) if isinstance(node, dict) else None
        if isinstance(value, str) and (stripped := without_userinfo(value)) != value:
            node[name] = stripped
            changed = True
    return out if changed else None


def upgrade() -> None:
    conn = op.get_bind()
    for row in conn.execute(sa.select(servers.c.id, servers.c.document, servers.c.version)).all():
        document = without_credentials(row.document or {})
        if document is not None:
            conn.execute(
                servers.update()
                .where(servers.c.id == row.id)
                .values(document=document, version=row.version + 1, updated_by="mailgate upgrade (0013)")
            )


def downgrade() -> None:
    pass  # the URLs without credentials are valid before this revision too
