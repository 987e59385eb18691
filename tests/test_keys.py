"""The keys that encrypt stored secrets, while mailgate runs (issue 18, item 8): a key file another
instance rotated is read again, so the worker keeps sending; keys from the environment can't be,
so the server whose secret no longer decrypts is marked broken with what to do, its messages
wait, the other servers keep sending, and the mark goes once the keys decrypt it again; a
missing key file is never silently replaced for a database that holds secrets. Real aiosmtpd
servers; SQLite and PostgreSQL where there is no key file."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from conftest import TEST_KEY
from mailgate import Mailgate
from mailgate.db.models import ConsentRequest
from mailgate.errors import SettingsError
from mailgate.oauth.consent import VERIFIER_FIELD
from mailgate.settings.secrets import Keyring, SecretsError, add_key_to_file
from smtp_servers import RecordingServer, ServerConfig, serve
from test_cli_settings import CLI
from test_outbox import FAST, note, server_doc, status, wait_until

AUTH = ServerConfig(auth={"PLAIN"}, auth_require_tls=False)


def with_password(server: RecordingServer, **changes: Any) -> dict[str, Any]:
    auth = {"method": "password", "username": server.config.username, "password": server.config.password}
    return server_doc(server, auth=auth, **changes)


def keys_in(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


@pytest.fixture
def key_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A SQLite database whose keys are in the key file beside it."""
    monkeypatch.delenv("MAILGATE_SECRET_KEYS", raising=False)
    return f"sqlite:///{tmp_path}/mailgate.db"


async def test_a_worker_keeps_sending_after_another_instance_rotates_the_key_file(
    key_file_url: str, tmp_path: Path
) -> None:
    async with serve(AUTH) as server, Mailgate.open(key_file_url, config=FAST) as mg:
        await mg.servers.set("global", with_password(server))
        await mg.tenants.add("early")
        await mg.tenants.add("late", may_use_own_server=True)
        await mg.servers.set("late", with_password(server, from_address="no-reply@late.example"))
        stop = asyncio.Event()
        worker = asyncio.create_task(mg.run_worker(stop))
        try:
            await mg.submit("early", note(subject="before"))
            await server.wait_for_messages(1)
            # `mailgate keys rotate --new-key`, run by the operator while this instance sends.
            rotated = await asyncio.to_thread(CLI(tmp_path, keys=None), "keys", "rotate", "--new-key")
            assert "re-encrypted 2 secret(s)" in rotated.stdout
            # Resolved for the first time now: its password is under the key this instance never read.
            await mg.submit("late", note(subject="after"))
            await server.wait_for_messages(2, timeout=10)
            assert not worker.done()
        finally:
            stop.set()
            await asyncio.wait_for(worker, 10)
    assert [str(m.parsed()["Subject"]) for m in server.messages] == ["before", "after"]


async def test_a_secret_saved_after_another_instance_rotated_is_under_the_new_key(
    key_file_url: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "mailgate.db.keys"
    async with serve(AUTH) as server, Mailgate.open(key_file_url) as mg:
        await mg.servers.set("global", with_password(server))
        add_key_to_file(key_file)  # another instance: a new key in front, then every secret rotated
        async with Mailgate.open(key_file_url) as other:
            assert await other.rotate_keys() == 1
        await mg.servers.set("global", with_password(server, from_name="Saved after"))
        new, _old = keys_in(key_file)
        key_file.write_text(new + "\n")  # the old key dropped, as the rotation allows
        async with Mailgate.open(key_file_url) as later:
            saved = await later.servers.with_secrets("global")
    assert saved is not None and saved.from_name == "Saved after"
    assert saved.auth.password.get_secret_value() == server.config.password  # type: ignore[union-attr]


async def test_keys_replaced_elsewhere_mark_the_server_broken_and_the_others_keep_sending(database_url: str) -> None:
    old, new = TEST_KEY, Fernet.generate_key().decode()
    async with serve(AUTH) as own, serve(ServerConfig()) as shared:
        async with Mailgate.open(database_url, secret_keys=old, config=FAST) as mg:
            await mg.servers.set("global", server_doc(shared))  # no secret
            await mg.tenants.add("a", may_use_own_server=True)
            await mg.tenants.add("b")
            await mg.servers.set("a", with_password(own))
            # Another instance rotates to a new key; this one was started with the old key only.
            async with Mailgate.open(database_url, secret_keys=f"{new},{old}") as other:
                assert await other.rotate_keys() == 1
            stop = asyncio.Event()
            worker = asyncio.create_task(mg.run_worker(stop))
            try:
                waiting = await mg.submit("a", note(subject="a"))
                sent = await mg.submit_many("b", [note(subject=f"b {i}", to=f"b{i}@example.org") for i in range(3)])
                await shared.wait_for_messages(3)
                await wait_until(lambda: _is(mg, waiting, "deferred"))
                assert not worker.done()
            finally:
                stop.set()
                await asyncio.wait_for(worker, 10)
            reason = (await mg.servers.health("a")).broken_reason
            assert reason == (
                "mailgate cannot decrypt the auth.password of the mail server of tenant a with the keys from "
                "MAILGATE_SECRET_KEYS: the keys changed since it was saved. Fix: restart mailgate with the "
                "MAILGATE_SECRET_KEYS the other instances use (the new key first, the old one after it), or run "
                "`mailgate keys rotate` with both keys in MAILGATE_SECRET_KEYS; or save the mail server's "
                "auth.password again."
            )
            assert (await mg.queue.get(waiting)).summary.last_error == f"waiting: {reason}"
            assert [await status(mg, pk) for pk in sent] == ["sent"] * 3
            # What the API and the admin UI call say the same, instead of failing on it.
            with pytest.raises(SecretsError) as resolving:
                await mg.resolve("a")
            assert str(resolving.value) == reason
            with pytest.raises(SecretsError, match="the keys changed since it was saved"):
                await mg.test_server("a", "someone@example.org")
        assert own.messages == []
        # Restarted with the keys the other instance uses: the mark goes, and so does the message.
        async with Mailgate.open(database_url, secret_keys=f"{new},{old}", config=FAST) as mg:
            await mg.run_worker(until_idle=True)
            assert await status(mg, waiting) == "sent"
            assert (await mg.servers.health("a")).broken_reason is None
            assert [e.action for e in await mg.audit_log("a")][:2] == ["server.mended", "server.broken"]
    assert [str(m.parsed()["Subject"]) for m in own.messages] == ["a"]


async def test_keys_rotate_mends_a_server_marked_broken_by_the_keys(database_url: str) -> None:
    old, new = TEST_KEY, Fernet.generate_key().decode()
    async with serve(AUTH) as server, Mailgate.open(database_url, secret_keys=old) as mg:
        info = await mg.servers.set("global", with_password(server))
        stale = await mg.servers.loaded("global")
        assert stale is not None
        async with Mailgate.open(database_url, secret_keys=new) as without:
            with pytest.raises(SecretsError) as e:  # what an instance without the old key marks it with
                await without.servers.loaded("global")
        assert await mg.servers.mark_broken(stale.id, info.version, str(e.value))
        async with Mailgate.open(database_url, secret_keys=f"{new},{old}") as both:
            assert await both.rotate_keys() == 1
        health = await mg.servers.health("global")
    assert health.broken_reason is None


async def test_keys_rotate_re_encrypts_the_verifier_of_a_consent_under_way(database_url: str) -> None:
    old, new = TEST_KEY, Fernet.generate_key().decode()
    delegated = {
        "from_address": "mailbox@example.com", "smtp": {"host": "smtp.office365.com", "port": 587},
        "auth": {"method": "oauth2", "username": "mailbox@example.com",
                 "token": {"grant": "delegated", "provider": "microsoft", "directory_id": "d", "client_id": "c",
                           "client_secret": "s"}},
    }  # fmt: skip
    async with Mailgate.open(database_url, secret_keys=old) as mg:
        await mg.servers.set("global", delegated)
        await mg.begin_consent("global", redirect_uri="https://mailgate.example/v1/oauth/callback")
    async with Mailgate.open(database_url, secret_keys=f"{new},{old}") as mg:
        assert await mg.rotate_keys() == 2  # the client secret, and the PKCE verifier waiting for the callback
        async with mg.db.sessions() as s:
            [verifier] = (await s.scalars(select(ConsentRequest.verifier))).all()
    assert Keyring([new], "the new key only").decrypt("global", VERIFIER_FIELD, verifier)


async def test_a_missing_key_file_is_not_made_anew_for_a_database_that_holds_secrets(
    key_file_url: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "mailgate.db.keys"
    async with serve(AUTH) as server, Mailgate.open(key_file_url) as mg:
        await mg.tenants.add("a", may_use_own_server=True)
        await mg.servers.set("global", with_password(server))
        await mg.servers.set("a", with_password(server))
    key_file.unlink()
    with pytest.raises(SettingsError) as e:
        await Mailgate.open(key_file_url)
    assert e.value.field == str(key_file)
    assert str(e.value) == (
        f"{key_file}: the key file is missing, and the database holds 2 encrypted secret(s) that only its keys "
        f"decrypt. Restore {key_file} from a backup (mode 0600), or set MAILGATE_SECRET_KEYS to the keys it held; "
        "mailgate makes a new key file only for a database without secrets"
    )
    assert not key_file.exists()


async def test_a_missing_key_file_is_made_for_a_database_without_secrets(key_file_url: str, tmp_path: Path) -> None:
    key_file = tmp_path / "mailgate.db.keys"
    async with Mailgate.open(key_file_url) as mg:
        await mg.tenants.add("a")  # settings, but no secret
    first = keys_in(key_file)
    key_file.unlink()
    async with Mailgate.open(key_file_url) as mg:
        assert [t.id for t in await mg.tenants.list()] == ["a"]
    assert len(keys_in(key_file)) == 1 and keys_in(key_file) != first


async def _is(mg: Mailgate, pk: int, wanted: str) -> bool:
    return await status(mg, pk) == wanted


async def test_the_api_says_which_secret_the_keys_cannot_decrypt_and_what_to_do(database_url: str) -> None:
    import httpx2

    from mailgate.api import create_app

    old, new = TEST_KEY, Fernet.generate_key().decode()
    async with serve(AUTH) as own, Mailgate.open(database_url, secret_keys=old, config=FAST) as mg:
        await mg.tenants.add("a", may_use_own_server=True)
        await mg.servers.set("a", with_password(own))
        async with Mailgate.open(database_url, secret_keys=f"{new},{old}") as other:
            await other.rotate_keys()
        admin, _ = await mg.api_tokens.create("system-admin")
        transport = httpx2.ASGITransport(app=create_app(mg))
        async with httpx2.AsyncClient(transport=transport, base_url="http://mailgate.test") as http:
            reply = await http.post("/v1/tenants/a/server/test", json={"to": "x@example.org"},
                                    headers={"Authorization": f"Bearer {admin}"})  # fmt: skip
    assert reply.status_code == 409 and reply.json()["code"] == "secret_unreadable", reply.text
    assert "auth.password of the mail server of tenant a" in reply.json()["message"]
    assert own.connection_count == 0
