"""Security review: the system information a tenant sees (the support page's preview, and its own
support address) tells of the operator's global server only its state, never its failure texts:
those are the operator's (its host, its account) or another tenant's message's."""

from __future__ import annotations

import json

from mailgate.support import attachment_bytes, summary, system_information
from test_support import Desk, desk

FIXTURES = (desk,)  # test_support.py's, found by pytest under this name here

OPERATOR_TEXT = "535 5.7.8 authentication failed for relay-account@operator.internal on relay-7.operator.internal"


async def test_the_global_servers_failure_texts_are_not_in_a_tenants_system_information(desk: Desk) -> None:
    glob = await desk.mg.servers.loaded("global")
    assert glob is not None
    from mailgate.db.models import now

    await desk.mg.servers.record_health({glob.id: {"last_failure_at": now(), "last_failure": OPERATOR_TEXT}})
    assert await desk.mg.servers.mark_broken(glob.id, glob.version, OPERATOR_TEXT)

    info = await system_information(desk.mg, "acme")
    shown = attachment_bytes(info).decode() + summary(info)
    assert "operator.internal" not in shown and "relay-account" not in shown
    health = json.loads(attachment_bytes(info))["servers"]["global"]["health"]
    assert health["status"] == "broken" and health["broken"]["since"] and health["last_failure"]["at"]
    # The tenant's own server is the tenant's: its texts stay whole (masked addresses).
    own = (await desk.mg.servers.health("global")).to_dict()
    assert own["broken"]["reason"] == OPERATOR_TEXT  # the operator still sees it in the server's health
