"""Migration 0009: mail server documents stored before issue 18's bounds still load after the
upgrade, lowered to the caps, and a tenant's ca_file (a path on mailgate's machine) is gone."""

from __future__ import annotations

import json

from sqlalchemy import text

from conftest import TEST_KEY
from mailgate import Mailgate
from mailgate.db.engine import connect, upgrade
from mailgate.db.engine import database_url as parse_url

OLD_DOCUMENT = {
    "kind": "smtp", "from_address": "no-reply@acme.example",
    "smtp": {"host": "smtp.acme.example", "port": 587, "security": "starttls-required", "ca_file": "/etc/passwd"},
    "auth": {"method": "none"},
    "connection": {"connect_timeout": 86400, "protocol_timeout": 3600.5, "pool_size": 10},
    "quota": {"max_concurrent_connections": 10**12},
}  # fmt: skip


async def test_documents_from_before_the_bounds_load_after_the_upgrade(database_url: str) -> None:
    db = connect(parse_url(database_url))
    try:
        await upgrade(db, "0008")
        async with db.engine.begin() as conn:
            await conn.execute(text("INSERT INTO tenants (id, name, may_use_own_server, may_set_support_address, "
                                    "created_at, updated_at) VALUES ('acme', 'Acme', true, false, "
                                    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))  # fmt: skip
            for scope, tenant in (("acme", "'acme'"), ("global", "NULL")):
                await conn.execute(
                    text("INSERT INTO mail_servers (scope, tenant_id, enabled, document, version, created_at, "
                         f"updated_at, updated_by) VALUES (:scope, {tenant}, true, :doc, 1, CURRENT_TIMESTAMP, "
                         "CURRENT_TIMESTAMP, 'old')"),
                    {"scope": scope, "doc": json.dumps(OLD_DOCUMENT)},
                )  # fmt: skip
        await upgrade(db)
    finally:
        await db.dispose()
    async with Mailgate.open(database_url, secret_keys=TEST_KEY) as mg:
        tenant = await mg.servers.with_secrets("acme")
        glob = await mg.servers.with_secrets("global")
        assert tenant is not None and glob is not None
        assert (tenant.connection.connect_timeout, tenant.connection.protocol_timeout) == (120, 600)
        assert tenant.quota.max_concurrent_connections == 1000
        assert tenant.smtp is not None and tenant.smtp.ca_file is None  # a tenant may not name a file
        assert glob.smtp is not None and glob.smtp.ca_file == "/etc/passwd"  # the operator may
        assert (await mg.servers.get("acme")).version == 2  # type: ignore[union-attr]
