"""Tenants and mail servers in the database: write-only secrets, the destination rule, versions,
the audit log, key rotation, and resolution by DESIGN.md's rules. Every test runs on SQLite and
on PostgreSQL (see conftest.py)."""

from __future__ import annotations

import base64
import copy
import json
import logging
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select, update

from conftest import TEST_KEY
from mailgate import Mailgate, SettingsError
from mailgate.db.models import ServerSecret
from mailgate.errors import Conflict, NotFound
from mailgate.settings.secrets import SecretsError

PASSWORD = "Pa55-global-s3cret"
TENANT_PASSWORD = "Pa55-acme-s3cret"


def smtp_doc(host: str = "smtp.example.com", password: str | None = PASSWORD, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "kind": "smtp",
        "from_address": "no-reply@example.com",
        "from_name": "Example",
        "smtp": {"host": host, "port": 587, "security": "starttls-required"},
        "auth": {"method": "password", "username": "no-reply@example.com"},
    }
    if password is not None:
        doc["auth"]["password"] = password
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return doc


def oauth_doc(**token: Any) -> dict[str, Any]:
    t = {
        "grant": "client_credentials", "provider": "microsoft", "directory_id": "contoso",
        "client_id": "app-1", "client_secret": "client-s3cret",
    }  # fmt: skip
    t.update(token)
    return smtp_doc(password=None, auth={"method": "oauth2", "username": "mailbox@example.com", "token": t})


def graph_doc(**graph: Any) -> dict[str, Any]:
    g = {"directory_id": "contoso", "client_id": "app-1", "client_secret": "graph-s3cret", "mailbox": "m@example.com"}
    g.update(graph)
    return {"kind": "graph", "from_address": "m@example.com", "graph": g}


# ---- the database ------------------------------------------------------------------------------


async def test_a_fresh_database_is_created_on_first_use(mg: Mailgate) -> None:
    from mailgate.db.engine import SCHEMA_REVISION, current_revision

    assert await current_revision(mg.db) == SCHEMA_REVISION
    assert await mg.tenants.list() == []


async def test_reopening_keeps_the_data(database_url: str) -> None:
    async with Mailgate.open(database_url, secret_keys=TEST_KEY) as mg:
        await mg.tenants.add("acme")
        await mg.servers.set("global", smtp_doc())
    async with Mailgate.open(database_url, secret_keys=TEST_KEY) as mg:
        assert [t.id for t in await mg.tenants.list()] == ["acme"]
        resolution = await mg.resolve("acme")
    assert resolution.server is not None
    assert resolution.server.auth.password.get_secret_value() == PASSWORD  # type: ignore[union-attr]


# ---- tenants -----------------------------------------------------------------------------------


async def test_tenants_add_get_update_list_remove(mg: Mailgate) -> None:
    added = await mg.tenants.add("acme", name="Acme Corp", support_address="help@acme.example")
    assert (added.name, added.may_use_own_server, added.support_address) == ("Acme Corp", False, "help@acme.example")
    await mg.tenants.add("beta")
    assert (await mg.tenants.get("beta")).name == "beta"
    updated = await mg.tenants.update("acme", may_use_own_server=True, may_set_support_address=True)
    assert updated.may_use_own_server and updated.may_set_support_address and updated.name == "Acme Corp"
    assert [t.id for t in await mg.tenants.list()] == ["acme", "beta"]
    await mg.tenants.remove("beta")
    assert [t.id for t in await mg.tenants.list()] == ["acme"]


@pytest.mark.parametrize(
    ("tenant_id", "text"), [("", "1-64"), ("a b", "1-64"), ("-x", "1-64"), ("x" * 65, "1-64"), ("GLOBAL", "global")]
)
async def test_bad_tenant_ids_are_refused(mg: Mailgate, tenant_id: str, text: str) -> None:
    with pytest.raises(SettingsError, match=text) as e:
        await mg.tenants.add(tenant_id)
    assert e.value.field == "tenant"


async def test_a_tenant_id_is_unique(mg: Mailgate) -> None:
    await mg.tenants.add("acme")
    with pytest.raises(Conflict, match="exists already"):
        await mg.tenants.add("acme")


async def test_a_bad_support_address_is_refused(mg: Mailgate) -> None:
    with pytest.raises(SettingsError) as e:
        await mg.tenants.add("acme", support_address="help@")
    assert e.value.field == "support_address"
    assert await mg.tenants.list() == []


async def test_unknown_tenants_are_named(mg: Mailgate) -> None:
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: mg.tenants.get("nope"),
        lambda: mg.tenants.update("nope", name="x"),
        lambda: mg.servers.get("nope"),
        lambda: mg.servers.set("nope", smtp_doc()),
        lambda: mg.resolve("nope"),
    ]
    for call in calls:
        with pytest.raises(NotFound, match="there is no tenant 'nope'") as e:
            await call()
        assert e.value.field == "tenant"


async def test_removing_a_tenant_removes_its_server_and_secrets(mg: Mailgate) -> None:
    await mg.tenants.add("acme")
    await mg.servers.set("acme", smtp_doc(password=TENANT_PASSWORD))
    await mg.tenants.remove("acme")
    async with mg.db.sessions() as s:
        assert (await s.scalars(select(ServerSecret))).all() == []


# ---- secrets are write-only --------------------------------------------------------------------


async def test_reading_a_server_shows_set_never_the_secret(mg: Mailgate) -> None:
    info = await mg.servers.set("global", smtp_doc())
    assert info.document["auth"]["password"] == {"set": True}
    shown = await mg.servers.get("global")
    assert shown is not None
    assert shown.document["auth"]["password"] == {"set": True}
    assert PASSWORD not in json.dumps(shown.to_dict())
    oauth = await mg.servers.set("global", oauth_doc())
    assert oauth.document["auth"]["token"]["client_secret"] == {"set": True}
    assert oauth.document["auth"]["token"]["refresh_token"] == {"set": False}
    graph = await mg.servers.set("global", graph_doc())
    assert graph.document["graph"]["client_secret"] == {"set": True}
    assert "s3cret" not in json.dumps([oauth.to_dict(), graph.to_dict()])


async def test_saving_without_the_secret_keeps_it_when_the_destination_is_unchanged(mg: Mailgate) -> None:
    await mg.servers.set("global", smtp_doc())
    await mg.servers.set("global", smtp_doc(password=None, from_name="Renamed", smtp={"helo_name": "mx.example.com"}))
    server = await mg.servers.with_secrets("global")
    assert server is not None and server.from_name == "Renamed"
    assert server.auth.password.get_secret_value() == PASSWORD  # type: ignore[union-attr]


async def test_a_read_document_can_be_saved_back_unchanged(mg: Mailgate) -> None:
    first = await mg.servers.set("global", smtp_doc())
    again = await mg.servers.set("global", first.document)  # {"set": true} means keep
    assert again.version == first.version + 1
    assert again.document == first.document
    server = await mg.servers.with_secrets("global")
    assert server is not None and server.auth.password.get_secret_value() == PASSWORD  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("base", "change", "secret", "moved"),
    [
        (smtp_doc(), smtp_doc(password=None, host="evil.example.net"), "auth.password", "smtp.host"),
        (smtp_doc(), smtp_doc(password=None, smtp={"port": 2525}), "auth.password", "smtp.port"),
        (smtp_doc(), smtp_doc(password=None, smtp={"security": "starttls"}), "auth.password", "smtp.security"),
        (oauth_doc(), oauth_doc(client_secret=None, token_url="https://evil.example.net/token"),
         "auth.token.client_secret", "auth.token.token_url"),
        (oauth_doc(), oauth_doc(client_secret=None, authority="https://login.evil.example.net"),
         "auth.token.client_secret", "auth.token.authority"),
        (oauth_doc(), oauth_doc(client_secret=None, directory_id="other"), "auth.token.client_secret",
         "auth.token.directory_id"),
        (oauth_doc(), oauth_doc(client_secret=None, client_id="app-2"), "auth.token.client_secret",
         "auth.token.client_id"),
        (graph_doc(), graph_doc(client_secret=None, endpoint="https://graph.evil.example.net"),
         "graph.client_secret", "graph.endpoint"),
    ],
)  # fmt: skip
async def test_stored_secret_is_not_sent_to_a_changed_destination(
    mg: Mailgate, base: dict[str, Any], change: dict[str, Any], secret: str, moved: str
) -> None:
    # An explicit null means "remove"; an absent field means "keep": take the secret out (of a
    # copy: the parameters serve both databases).
    change = copy.deepcopy(change)
    *parents, name = secret.split(".")
    node = change
    for part in parents:
        node = node[part]
    node.pop(name, None)
    before = await mg.servers.set("global", base)
    with pytest.raises(SettingsError) as e:
        await mg.servers.set("global", change)
    assert e.value.field == secret
    assert moved in str(e.value) and "give it again" in str(e.value)
    after = await mg.servers.get("global")
    assert after is not None and after.version == before.version and after.document == before.document


async def test_a_changed_destination_is_accepted_with_the_secret_given_again(mg: Mailgate) -> None:
    await mg.servers.set("global", smtp_doc())
    await mg.servers.set("global", smtp_doc(host="smtp2.example.com", password="new-one"))
    server = await mg.servers.with_secrets("global")
    assert server is not None and server.smtp is not None and server.smtp.host == "smtp2.example.com"
    assert server.auth.password.get_secret_value() == "new-one"  # type: ignore[union-attr]


async def test_a_required_secret_can_not_be_left_out_or_removed(mg: Mailgate) -> None:
    with pytest.raises(SettingsError) as e:
        await mg.servers.set("global", smtp_doc(password=None))
    assert e.value.problems == [("auth.password", "is required")]
    await mg.servers.set("global", smtp_doc())
    for removal in (None, {"set": False}):
        doc = smtp_doc()
        doc["auth"]["password"] = removal
        with pytest.raises(SettingsError, match="is required"):
            await mg.servers.set("global", doc)


async def test_an_optional_secret_is_removed_by_null(mg: Mailgate) -> None:
    await mg.servers.set("global", oauth_doc(refresh_token="rt-s3cret"))
    info = await mg.servers.set("global", oauth_doc(client_secret={"set": True}, refresh_token=None))
    assert info.document["auth"]["token"]["refresh_token"] == {"set": False}
    assert info.document["auth"]["token"]["client_secret"] == {"set": True}


async def test_secrets_given_apart_from_the_document(mg: Mailgate) -> None:
    await mg.servers.set("global", smtp_doc(password=None), secrets={"auth.password": "from-stdin"})
    server = await mg.servers.with_secrets("global")
    assert server is not None and server.auth.password.get_secret_value() == "from-stdin"  # type: ignore[union-attr]
    with pytest.raises(SettingsError) as e:
        await mg.servers.set("global", oauth_doc(), secrets={"auth.password": "x"})
    assert e.value.field == "auth.password" and "auth.token.client_secret" in str(e.value)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (smtp_doc(smtp={"host": {"set": True}}), "smtp.host"),
        (smtp_doc(auth={"method": "none", "password": "x"}), "auth.password"),
        (smtp_doc(password=12345), "auth.password"),
    ],
)
async def test_a_secret_in_a_field_that_takes_none_is_named(mg: Mailgate, doc: dict[str, Any], field: str) -> None:
    with pytest.raises(SettingsError) as e:
        await mg.servers.set("global", doc)
    assert field in [f for f, _ in e.value.problems]
    assert await mg.servers.get("global") is None


async def test_nothing_is_half_saved(mg: Mailgate) -> None:
    before = await mg.servers.set("global", smtp_doc())
    with pytest.raises(SettingsError):
        await mg.servers.set("global", smtp_doc(password="other", smtp={"port": 70000}))
    after = await mg.servers.get("global")
    assert after == before
    server = await mg.servers.with_secrets("global")
    assert server is not None and server.auth.password.get_secret_value() == PASSWORD  # type: ignore[union-attr]


async def test_every_save_enable_and_disable_bumps_the_version(mg: Mailgate) -> None:
    assert (await mg.servers.set("global", smtp_doc())).version == 1
    assert (await mg.servers.set("global", smtp_doc(from_name="x"))).version == 2
    assert (await mg.servers.disable("global")).version == 3
    assert (await mg.servers.disable("global")).version == 3  # no change, no new version
    assert (await mg.servers.enable("global")).version == 4


async def test_enable_disable_and_delete_a_missing_server_are_named(mg: Mailgate) -> None:
    for call in (mg.servers.enable, mg.servers.disable, mg.servers.delete):
        with pytest.raises(NotFound, match="no mail server is set for global"):
            await call("global")


async def test_a_ciphertext_moved_to_another_server_does_not_decrypt(mg: Mailgate) -> None:
    await mg.tenants.add("acme", may_use_own_server=True)
    await mg.servers.set("global", smtp_doc())
    await mg.servers.set("acme", smtp_doc(password=TENANT_PASSWORD))
    async with mg.db.sessions.begin() as s:
        rows = {r.server_id: r for r in await s.scalars(select(ServerSecret))}
        global_id, acme_id = sorted(rows)
        await s.execute(update(ServerSecret).where(ServerSecret.server_id == acme_id)
                        .values(ciphertext=rows[global_id].ciphertext))  # fmt: skip
    with pytest.raises(SecretsError, match="belongs to another server"):
        await mg.resolve("acme")


# ---- encryption at rest ------------------------------------------------------------------------


async def test_the_database_file_holds_no_secret(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/mailgate.db"
    secrets = [PASSWORD, "client-s3cret-value", "refresh-t0ken-value", "graph-s3cret-value"]
    async with Mailgate.open(url, secret_keys=TEST_KEY) as mg:
        await mg.tenants.add("acme")
        await mg.tenants.add("graph")
        await mg.servers.set("global", smtp_doc())
        await mg.servers.set("acme", oauth_doc(client_secret=secrets[1], refresh_token=secrets[2]))
        await mg.servers.set("graph", graph_doc(client_secret=secrets[3]))
        stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("mailgate.db"))
    assert b"smtp.example.com" in stored  # the file does hold the settings...
    for secret in secrets:  # ...but no secret, in any form
        for form in (secret.encode(), base64.b64encode(secret.encode()), secret.encode("utf-16-le")):
            assert form not in stored, f"{secret} found in the database file"


async def test_without_keys_a_key_file_is_made_beside_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("MAILGATE_SECRET_KEYS", raising=False)
    url = f"sqlite:///{tmp_path}/mailgate.db"
    with caplog.at_level(logging.WARNING, logger="mailgate"):
        async with Mailgate.open(url) as mg:
            await mg.servers.set("global", smtp_doc())
    key_file = tmp_path / "mailgate.db.keys"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert str(key_file) in caplog.text  # the operator is told where
    async with Mailgate.open(url) as mg:  # the same key is found again
        server = await mg.servers.with_secrets("global")
    assert server is not None and server.auth.password.get_secret_value() == PASSWORD  # type: ignore[union-attr]


async def test_postgresql_without_keys_is_a_clear_error(
    postgres_schema_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MAILGATE_SECRET_KEYS", raising=False)
    with pytest.raises(SettingsError, match="every machine must use the same keys") as e:
        await Mailgate.open(postgres_schema_url)
    assert e.value.field == "MAILGATE_SECRET_KEYS"


async def test_a_bad_key_is_named(database_url: str) -> None:
    with pytest.raises(SettingsError, match="key 2 is not a Fernet key"):
        await Mailgate.open(database_url, secret_keys=f"{TEST_KEY},not-a-key")


async def test_keys_rotate_re_encrypts_every_secret_under_the_newest_key(database_url: str) -> None:
    old, new = TEST_KEY, Fernet.generate_key().decode()
    async with Mailgate.open(database_url, secret_keys=old) as mg:
        await mg.tenants.add("acme", may_use_own_server=True)
        await mg.servers.set("global", smtp_doc())
        await mg.servers.set("acme", oauth_doc(refresh_token="rt"))
    async with Mailgate.open(database_url, secret_keys=f"{new},{old}") as mg:
        assert await mg.rotate_keys() == 3
        assert "keys.rotate" in [e.action for e in await mg.audit_log()]
    async with Mailgate.open(database_url, secret_keys=new) as mg:  # the old key is gone now
        resolution = await mg.resolve("acme")
        assert resolution.server is not None
        assert resolution.server.auth.token.refresh_token.get_secret_value() == "rt"  # type: ignore[union-attr]
    async with Mailgate.open(database_url, secret_keys=old) as mg:
        with pytest.raises(SecretsError, match="cannot decrypt"):
            await mg.resolve("acme")


# ---- audit -------------------------------------------------------------------------------------


async def test_every_change_is_audited_with_secrets_only_as_changed(mg: Mailgate) -> None:
    await mg.tenants.add("acme", may_use_own_server=True)
    await mg.tenants.update("acme", name="Acme Corp")
    await mg.servers.set("acme", smtp_doc(password=TENANT_PASSWORD))
    await mg.servers.set("acme", smtp_doc(password="second-" + TENANT_PASSWORD, from_name="Acme"))
    await mg.servers.disable("acme")
    await mg.servers.delete("acme")
    entries = list(reversed(await mg.audit_log("acme")))
    assert [e.action for e in entries] == [
        "tenant.add", "tenant.update", "server.set", "server.set", "server.disable", "server.delete",
    ]  # fmt: skip
    assert all(e.actor == "tester" for e in entries)
    assert {"field": "name", "from": "acme", "to": "Acme Corp"} in entries[1].changes
    assert entries[3].changes == [
        {"field": "from_name", "from": "Example", "to": "Acme"},
        {"field": "auth.password", "secret": "changed"},
    ]
    assert entries[4].changes == [{"field": "enabled", "from": True, "to": False}]
    assert TENANT_PASSWORD not in json.dumps([e.to_dict() for e in entries])


# ---- resolution (DESIGN.md) --------------------------------------------------------------------


async def setup_tenant(mg: Mailgate, *, may_use_own: bool = True, own_enabled: bool | None = True) -> None:
    await mg.tenants.add("acme", may_use_own_server=may_use_own)
    if own_enabled is not None:
        own = smtp_doc(host="smtp.acme.example", password=TENANT_PASSWORD, from_address="noreply@acme.example")
        await mg.servers.set("acme", {**own, "enabled": own_enabled})


async def test_no_global_server_disables_sending_for_everyone(mg: Mailgate) -> None:
    await setup_tenant(mg)
    resolution = await mg.resolve("acme")
    assert resolution.disabled and resolution.source is None
    assert "global mail server is not set: sending is disabled for every tenant" in resolution.reason


async def test_global_server_switched_off_disables_even_tenants_with_their_own(mg: Mailgate) -> None:
    await setup_tenant(mg)
    await mg.servers.set("global", smtp_doc(enabled=False))
    resolution = await mg.resolve("acme")
    assert resolution.disabled
    assert "switched off: sending is disabled for every tenant" in resolution.reason


async def test_tenant_with_its_own_enabled_server_that_it_may_use_sends_through_it(mg: Mailgate) -> None:
    await setup_tenant(mg)
    await mg.servers.set("global", smtp_doc())
    resolution = await mg.resolve("acme")
    assert resolution.source == "tenant" and resolution.server is not None
    assert resolution.server.smtp is not None and resolution.server.smtp.host == "smtp.acme.example"


async def test_tenant_that_may_not_use_its_own_server_uses_the_global_one(mg: Mailgate) -> None:
    await setup_tenant(mg, may_use_own=False)
    await mg.servers.set("global", smtp_doc())
    resolution = await mg.resolve("acme")
    assert resolution.source == "global"
    assert "may not use it" in resolution.reason


async def test_tenant_whose_own_server_is_switched_off_uses_the_global_one(mg: Mailgate) -> None:
    await setup_tenant(mg, own_enabled=False)
    await mg.servers.set("global", smtp_doc())
    resolution = await mg.resolve("acme")
    assert resolution.source == "global"
    assert "switched off" in resolution.reason


async def test_tenant_without_its_own_server_uses_the_global_one(mg: Mailgate) -> None:
    await setup_tenant(mg, own_enabled=None)
    await mg.servers.set("global", smtp_doc())
    resolution = await mg.resolve("acme")
    assert resolution.source == "global"
    assert "has no mail server of its own" in resolution.reason


async def test_resolution_never_mixes_two_servers_fields(mg: Mailgate) -> None:
    await setup_tenant(mg)
    await mg.servers.set("global", smtp_doc(reply_to="global-replies@example.com", connection={"pool_size": 3}))
    tenant = (await mg.resolve("acme")).server
    assert tenant is not None and tenant.smtp is not None
    assert (tenant.from_address, tenant.smtp.host, tenant.reply_to, tenant.connection.pool_size) == (
        "noreply@acme.example", "smtp.acme.example", None, 10,
    )  # fmt: skip
    assert tenant.auth.password.get_secret_value() == TENANT_PASSWORD  # type: ignore[union-attr]
    await mg.servers.disable("acme")
    glob = (await mg.resolve("acme")).server
    assert glob is not None and glob.smtp is not None
    assert (glob.from_address, glob.smtp.host, glob.reply_to, glob.connection.pool_size) == (
        "no-reply@example.com", "smtp.example.com", "global-replies@example.com", 3,
    )  # fmt: skip
    assert glob.auth.password.get_secret_value() == PASSWORD  # type: ignore[union-attr]


async def test_resolution_carries_the_server_version(mg: Mailgate) -> None:
    await setup_tenant(mg, own_enabled=None)
    await mg.servers.set("global", smtp_doc())
    first = await mg.resolve("acme")
    await mg.servers.set("global", smtp_doc(from_name="changed"))
    second = await mg.resolve("acme")
    assert (first.server_id, first.version) == (second.server_id, 1)
    assert second.version == 2


async def test_an_empty_key_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILGATE_SECRET_KEYS", raising=False)
    (tmp_path / "mailgate.db.keys").write_text("# no keys here\n")
    (tmp_path / "mailgate.db.keys").chmod(0o600)
    with pytest.raises(SettingsError, match="holds no key") as e:
        await Mailgate.open(f"sqlite:///{tmp_path}/mailgate.db")
    assert e.value.field.endswith("mailgate.db.keys")


@pytest.mark.parametrize("tenant", ["acme\x00", "acme\ud800", "a" * 65, "ac me"])
async def test_a_tenant_id_that_is_not_one_is_not_found_anywhere(mg: Mailgate, tenant: str) -> None:
    from mailgate import Message
    from mailgate.errors import NotFound

    await mg.tenants.add("acme")
    await mg.servers.set("global", smtp_doc())
    for attempt in (mg.resolve(tenant), mg.tenants.get(tenant),
                    mg.submit(tenant, Message(to="bob@example.org", subject="s"))):  # fmt: skip
        with pytest.raises(NotFound):
            await attempt
