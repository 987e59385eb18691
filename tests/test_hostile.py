"""A hostile tenant against the real HTTP API: `mailgate serve` in its own process, on the operator's
defaults (tenants may reach public addresses only; SQLite with its key file in the working
directory), and a tenant admin's and a sender's tokens doing what issue 18 found they could:

1. point their mail server, token URL or Graph endpoint at the operator's network;
2. make mailgate open a file of their choosing (ca_file);
3. send numbers and lists without bounds;
4. send lone surrogates, NUL and control characters;
5. guess a password in parallel;
6. frame the admin UI, or make mailgate's own page say their words;
7. make a stored secret go to another destination, read it back in a server's reply, read the
   database files, or read an earlier tenant's audit log under the same id;
8. and the operator rotating keys while mailgate runs, or losing the key file.

Each test would pass on the code before issue 18 only by failing."""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from smtp_servers import RecordingServer, ServerConfig, serve_in_thread
from test_serve import MAILGATE, Served

RELAY_PASSWORD = "relay-Pa55word-never-shown"
ADMIN_EMAIL, ADMIN_PASSWORD = "root@operator.example", "correct horse battery staple"


class Operator:
    """The served mailgate, its system-admin token, and the global server it sends through."""

    def __init__(self, served: Served, admin: str, relay: RecordingServer) -> None:
        self.served, self.relay = served, relay
        self.http = httpx2.Client(base_url=served.url, headers={"Authorization": f"Bearer {admin}"}, timeout=30)
        self._tenants = 0
        self._clients = [self.http]

    def tenant(self, **fields: Any) -> tuple[str, httpx2.Client, httpx2.Client]:
        """A new tenant that may use its own server: (its id, its admin's client, its sender's client)."""
        self._tenants += 1
        tenant = f"t{self._tenants}"
        reply = self.http.post("/v1/tenants", json={"id": tenant, "may_use_own_server": True, **fields})
        assert reply.status_code == 201, reply.text
        return tenant, self.client("tenant-admin", tenant), self.client("sender", tenant)

    def client(self, role: str, tenant: str) -> httpx2.Client:
        token = json.loads(self.served.cli("tokens", "create", "--role", role, "--tenant", tenant, "--json"))["token"]
        client = httpx2.Client(base_url=self.served.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()


@pytest.fixture(scope="module")
def relay() -> Iterator[RecordingServer]:
    """The operator's relay on loopback, with a password: the global server's secret is real."""
    config = ServerConfig(auth={"PLAIN"}, auth_require_tls=False, password=RELAY_PASSWORD)
    with serve_in_thread(config) as server:
        yield server


@pytest.fixture(scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory, relay: RecordingServer) -> Iterator[Operator]:
    cwd = tmp_path_factory.mktemp("hostile")
    drop = ("MAILGATE_DATABASE_URL", "MAILGATE_CONFIG_FILE", "MAILGATE_SECRET_KEYS", "MAILGATE_TENANT_NETWORKS")
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "MAILGATE_POLL_INTERVAL": "0.1",
           "MAILGATE_RETRY_BASE": "0.2", "MAILGATE_RETRY_MAX_DELAY": "0.5"}  # fmt: skip
    served = Served(cwd, env, [])
    try:
        admin = served.cli("tokens", "create", "--role", "system-admin").strip()
        op = Operator(served, admin, relay)
        glob = {"from_address": "no-reply@operator.example",
                "smtp": {"host": relay.host, "port": relay.port, "security": "none"},
                "auth": {"method": "password", "username": relay.config.username, "password": RELAY_PASSWORD},
                "connection": {"connect_timeout": 5, "protocol_timeout": 5}}  # fmt: skip
        reply = op.http.put("/v1/servers/global", json=glob)
        assert reply.status_code == 200, reply.text  # the global server may reach loopback
        yield op
        op.close()
    finally:
        served.stop()


def problems(reply: httpx2.Response) -> dict[str, str]:
    return {p["field"]: p["problem"] for p in reply.json().get("problems", [])}


def smtp_server(host: str, port: int = 25, **smtp: Any) -> dict[str, Any]:
    return {"from_address": "no-reply@tenant.example", "smtp": {"host": host, "port": port, "security": "none", **smtp},
            "connection": {"connect_timeout": 3, "protocol_timeout": 3}}  # fmt: skip


def wait_for(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return result


# ---- 1. the operator's network ------------------------------------------------------------------

LOOPBACK = ["127.0.0.1", "localhost", "2130706433", "0x7f.1", "::1", "::ffff:127.0.0.1", "0.0.0.0", "127.9.9.9"]
INTERNAL = ["10.0.0.5", "192.168.1.10", "169.254.169.254", "fd00:ec2::254"]


def test_a_tenant_server_on_the_operators_network_is_refused_when_saved(operator: Operator) -> None:
    tenant, admin, _ = operator.tenant()
    relay = operator.relay
    before = relay.connection_count
    for host in LOOPBACK + INTERNAL:
        reply = admin.put(f"/v1/tenants/{tenant}/server", json=smtp_server(host, relay.port))
        assert reply.status_code == 422, (host, reply.text)
        assert "MAILGATE_TENANT_NETWORKS" in problems(reply)["smtp.host"], host
    assert relay.connection_count == before  # nothing was even tried


@pytest.mark.parametrize(
    ("field", "server"),
    [
        ("auth.token.token_url", {"auth": {"method": "oauth2", "username": "u@tenant.example",
                                           "token": {"grant": "client_credentials", "client_id": "c",
                                                     "client_secret": "s", "token_url": "http://127.0.0.1:9/token"}}}),
        ("auth.token.authority", {"auth": {"method": "oauth2", "username": "u@tenant.example",
                                           "token": {"grant": "client_credentials", "provider": "microsoft",
                                                     "authority": "http://localhost:9", "directory_id": "d",
                                                     "client_id": "c", "client_secret": "s"}}}),
        ("graph.endpoint", {"kind": "graph", "smtp": None,
                            "graph": {"endpoint": "https://169.254.169.254", "directory_id": "d", "client_id": "c",
                                      "client_secret": "s", "mailbox": "no-reply@tenant.example"}}),
    ],
)  # fmt: skip
def test_token_urls_and_graph_endpoints_on_the_operators_network_are_refused(
    operator: Operator, field: str, server: dict[str, Any]
) -> None:
    tenant, admin, _ = operator.tenant()
    document = {**smtp_server("smtp.tenant.example", 587), **server}
    document = {k: v for k, v in document.items() if v is not None}
    reply = admin.put(f"/v1/tenants/{tenant}/server", json=document)
    assert reply.status_code == 422 and "MAILGATE_TENANT_NETWORKS" in problems(reply)[field], reply.text


def test_the_test_e_mail_of_unsaved_settings_never_connects_to_the_operators_network(operator: Operator) -> None:
    tenant, admin, _ = operator.tenant()
    relay = operator.relay
    before = relay.connection_count
    for host in ("127.0.0.1", "localhost", "2130706433"):
        reply = admin.post(f"/v1/tenants/{tenant}/server/test",
                           json={"to": "admin@tenant.example", "settings": smtp_server(host, relay.port)})  # fmt: skip
        assert reply.status_code in (200, 422), reply.text
        text = reply.text
        assert "MAILGATE_TENANT_NETWORKS" in text and "ESMTP" not in text and "PLAIN" not in text, text
    assert relay.connection_count == before


def test_a_name_that_resolves_to_loopback_later_is_refused_when_connecting(operator: Operator) -> None:
    """What a rebinding DNS server does (a public address when saved, loopback when used) is what
    a server saved while the operator allowed loopback, then used after they stopped allowing it,
    looks like to the worker: it must check again, at connect time."""
    tenant, _, sender = operator.tenant()
    relay = operator.relay
    allowed = {**os.environ, "MAILGATE_TENANT_NETWORKS": "loopback"}
    allowed.pop("MAILGATE_SECRET_KEYS", None)
    (operator.served.cwd / "t.json").write_text(json.dumps(smtp_server("localhost", relay.port)))
    done = subprocess.run([MAILGATE, "servers", "set", tenant, "--file", "t.json"], cwd=operator.served.cwd,
                          env=allowed, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    before = relay.connection_count
    reply = sender.post("/v1/messages", json={"to": ["bob@example.org"], "subject": "s", "text": "t"})
    assert reply.status_code == 202, reply.text
    url = reply.headers["location"]
    shown = wait_for(lambda: (m := sender.get(url).json())["attempts"] and m, "no attempt")
    assert shown["status"] != "sent" and "MAILGATE_TENANT_NETWORKS" in json.dumps(shown), shown
    assert relay.connection_count == before


def test_the_global_server_is_the_operators_and_may_use_loopback(operator: Operator) -> None:
    _, _, sender = operator.tenant()
    reply = sender.post("/v1/messages", json={"to": ["bob@example.org"], "subject": "via the relay", "text": "t"})
    url = reply.headers["location"]
    wait_for(lambda: sender.get(url).json()["status"] == "sent", "not sent through the global server")


# ---- 2. ca_file ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/etc/passwd", "/proc/self/fd/1", "/nonexistent/ca.pem"])
def test_a_tenant_may_not_name_a_file_on_mailgates_machine(operator: Operator, path: str) -> None:
    tenant, admin, _ = operator.tenant()
    reply = admin.put(f"/v1/tenants/{tenant}/server", json=smtp_server("smtp.tenant.example", 587, ca_file=path))
    assert reply.status_code == 422 and "ca_certificate" in problems(reply)["smtp.ca_file"], reply.text
    reply = admin.post(f"/v1/tenants/{tenant}/server/test", json={
        "to": "a@tenant.example", "settings": smtp_server("smtp.tenant.example", 587, ca_file=path)})  # fmt: skip
    assert reply.status_code == 422 and "smtp.ca_file" in problems(reply), reply.text


def test_the_global_servers_ca_file_must_be_a_regular_file_and_never_blocks(operator: Operator, tmp_path: Path) -> None:
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)  # opened for reading, a FIFO waits for a writer forever
    document = smtp_server(operator.relay.host, operator.relay.port, security="tls", ca_file=str(fifo))
    with httpx2.Client(base_url=operator.served.url, timeout=5) as anyone:
        reply = operator.http.post("/v1/servers/global/test", json={"to": "a@operator.example", "settings": document},
                                   timeout=20)  # fmt: skip
        assert anyone.get("/healthz").status_code == 200
    assert reply.status_code == 200, reply.text
    assert reply.json()["ok"] is False and "regular file" in reply.text, reply.text


# ---- 3. bounds ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "section", "value"),
    [
        ("quota.max_concurrent_connections", "quota", {"max_concurrent_connections": 10**30}),
        ("connection.protocol_timeout", "connection", {"protocol_timeout": 86400}),
        ("connection.connect_timeout", "connection", {"connect_timeout": 86400}),
    ],
)
def test_numbers_in_a_tenants_settings_are_bounded(
    operator: Operator, field: str, section: str, value: dict[str, Any]
) -> None:
    tenant, admin, _ = operator.tenant()
    reply = admin.put(f"/v1/tenants/{tenant}/server", json={**smtp_server("smtp.tenant.example", 587), section: value})
    assert reply.status_code == 422 and field in problems(reply), reply.text


def test_a_flood_of_bad_recipients_gets_a_small_answer_and_healthz_still_answers(operator: Operator) -> None:
    _, _, sender = operator.tenant()
    body = json.dumps({"to": [1] * 2_000_000, "subject": "s"})  # 4 MB of bad items
    reply = sender.post("/v1/messages", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 422 and len(reply.content) < 64 * 1024, (reply.status_code, len(reply.content))
    assert len(reply.json()["problems"]) <= 51
    with httpx2.Client(base_url=operator.served.url, timeout=5) as anyone:
        assert anyone.get("/healthz").status_code == 200


# ---- 4. surrogates, NUL, control characters ----------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        {"subject": "\ud800"},
        {"subject": "a\x00b"},
        {"text": "a\x00b"},
        {"to": [{"address": "bob@example.org", "name": "Bob\udfff"}]},
        {"headers": {"X-Tag": "a\x1bb"}},
        {"attachments": [{"filename": "a\x00.pdf", "content_type": "application/pdf", "content_base64": "aGk="}]},
    ],
)
def test_a_message_with_a_lone_surrogate_or_a_control_character_is_refused(
    operator: Operator, message: dict[str, Any]
) -> None:
    tenant, admin, sender = operator.tenant()
    body = {"to": ["bob@example.org"], "subject": "s", "text": "t", **message}
    raw = json.dumps(body)  # "\ud800" goes as the JSON escape a client would send
    reply = sender.post("/v1/messages", content=raw, headers={"Content-Type": "application/json"})
    assert reply.status_code == 422, reply.text
    listed = admin.get("/v1/messages", params={"tenant": tenant})
    assert listed.status_code == 200 and listed.json()["messages"] == []


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/tenants", {"id": "surrogate", "name": "Acme \ud800"}, "name"),
        ("/v1/tenants", {"id": "nul", "name": "Acme\x00"}, "name"),
    ],
)
def test_a_tenant_name_with_a_lone_surrogate_or_nul_is_refused(
    operator: Operator, path: str, body: dict[str, Any], field: str
) -> None:
    reply = operator.http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert reply.status_code == 422 and field in problems(reply), reply.text
    assert operator.http.get("/v1/tenants").status_code == 200


@pytest.mark.parametrize(("field", "value"), [("from_name", "Eve\x00"), ("from_name", "\ud800"),
                                              ("smtp.host", "smtp\x00.tenant.example")])  # fmt: skip
def test_a_server_setting_with_a_lone_surrogate_or_nul_is_refused(operator: Operator, field: str, value: str) -> None:
    tenant, admin, _ = operator.tenant()
    document = smtp_server("smtp.tenant.example", 587)
    if field == "smtp.host":
        document["smtp"]["host"] = value
    else:
        document[field] = value
    reply = admin.put(f"/v1/tenants/{tenant}/server", content=json.dumps(document),
                      headers={"Content-Type": "application/json"})  # fmt: skip
    assert reply.status_code == 422 and field in problems(reply), reply.text


# ---- 5. guessing a password ---------------------------------------------------------------------


async def test_forty_parallel_wrong_guesses_leave_no_window(operator: Operator) -> None:
    done = subprocess.run([MAILGATE, "users", "create", ADMIN_EMAIL, "--role", "system-admin", "--password-stdin"],
                          cwd=operator.served.cwd, env=operator.served.env, input=ADMIN_PASSWORD, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr

    csrf = re.compile(r'name="csrf_token" value="([^"]+)"')

    async def guess(password: str) -> str:
        async with httpx2.AsyncClient(base_url=operator.served.url, timeout=60) as browser:
            page = await browser.get("/admin/login")
            token = html.unescape(csrf.search(page.text).group(1))  # type: ignore[union-attr]
            reply = await browser.post("/admin/login", data={"email": ADMIN_EMAIL, "password": password,
                                                             "csrf_token": token})  # fmt: skip
            if reply.status_code == 303:
                return "signed in"
            return "locked" if "too many failed sign-ins" in reply.text else "not right"

    # Forty at once: five are checked, the others refused before any password is (before issue
    # 18 nearly all were checked: each looked at the failures before any had been counted).
    answers = await asyncio.gather(*(guess(f"wrong guess {i}") for i in range(40)))
    assert answers.count("not right") == 5 and answers.count("locked") == 35, answers
    assert await guess(ADMIN_PASSWORD) == "locked"  # the right password too, now


# ---- 6. framing, and words on mailgate's pages ----------------------------------------------------


def test_admin_pages_may_not_be_framed_nor_cached(operator: Operator) -> None:
    with httpx2.Client(base_url=operator.served.url, timeout=10) as browser:
        reply = browser.get("/admin/login")
    assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]
    assert reply.headers["x-frame-options"] == "DENY" and reply.headers["cache-control"] == "no-store"


def test_the_oauth_done_page_says_only_mailgates_words(operator: Operator) -> None:
    crafted = "Your mailbox is suspended. Call +1-800-555-0100 to restore it"
    with httpx2.Client(base_url=operator.served.url, timeout=10) as browser:
        for params in ({"ok": "0", "text": crafted}, {"ok": "1", "text": crafted}, {"result": crafted}):
            page = browser.get("/v1/oauth/callback/done", params=params)
            assert "+1-800" not in page.text and "suspended" not in page.text, page.text
        callback = browser.get("/v1/oauth/callback", params={"error": "access_denied", "error_description": crafted},
                               follow_redirects=True)  # fmt: skip
        assert "+1-800" not in callback.text and "suspended" not in callback.text, callback.text


# ---- 7. secrets, files, the audit log -----------------------------------------------------------


def test_a_changed_certificate_check_needs_the_secret_again(operator: Operator) -> None:
    tenant, admin, _ = operator.tenant()
    first = {**smtp_server("smtp.tenant.example", 587, security="starttls-required"),
             "auth": {"method": "password", "username": "u", "password": "tenant-secret-1"}}  # fmt: skip
    assert admin.put(f"/v1/tenants/{tenant}/server", json=first).status_code == 200
    for change in ({"verify_certificate": False}, {"ca_certificate": _any_ca_pem()}):
        moved = {**first, "smtp": {**first["smtp"], **change}, "auth": {**first["auth"], "password": {"set": True}}}
        reply = admin.put(f"/v1/tenants/{tenant}/server", json=moved)
        assert reply.status_code == 422 and "auth.password" in problems(reply), reply.text


def _any_ca_pem() -> str:
    from certs import make_ca

    return make_ca().cert_pem.decode()


def test_a_server_that_echoes_the_password_does_not_show_it(operator: Operator) -> None:
    echo = "correct-horse-echo-9"
    config = ServerConfig(auth={"PLAIN", "LOGIN"}, auth_require_tls=False, password="something else",
                          auth_failure=f"535 5.7.8 password {echo} is not right")  # fmt: skip
    with serve_in_thread(config) as liar:
        document = {**smtp_server(liar.host, liar.port),
                    "auth": {"method": "password", "username": "u@operator.example", "password": echo}}  # fmt: skip
        reply = operator.http.post("/v1/servers/global/test", json={"to": "a@operator.example", "settings": document})
    assert reply.status_code == 200 and reply.json()["ok"] is False, reply.text
    assert echo not in reply.text and "[redacted]" in reply.text, reply.text


def test_the_database_files_are_for_mailgate_alone(operator: Operator) -> None:
    cwd = operator.served.cwd
    files = [cwd / name for name in ("mailgate.db", "mailgate.db-wal", "mailgate.db-shm", "mailgate.db.keys")]
    assert files[0].exists() and files[3].exists()  # the -wal and -shm files exist while serve writes
    for path in files:
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_a_recreated_tenant_does_not_see_the_old_ones_audit_log(operator: Operator) -> None:
    http = operator.http
    assert http.post("/v1/tenants", json={"id": "reborn", "name": "First owner"}).status_code == 201
    assert http.patch("/v1/tenants/reborn", json={"support_address": "help@first-owner.example"}).status_code == 200
    assert http.delete("/v1/tenants/reborn").status_code in (200, 204)
    assert http.post("/v1/tenants", json={"id": "reborn", "name": "Second owner"}).status_code == 201
    admin = operator.client("tenant-admin", "reborn")
    log = admin.get("/v1/audit", params={"tenant": "reborn"})
    assert log.status_code == 200, log.text
    assert "first-owner" not in log.text and "First owner" not in log.text, log.text
    assert "Second owner" in log.text


# ---- 8. keys --------------------------------------------------------------------------------------


def test_rotating_the_keys_while_mailgate_runs_does_not_stop_delivery(operator: Operator) -> None:
    _, _, sender = operator.tenant()
    operator.served.cli("keys", "rotate", "--new-key")  # another process: new key first, every secret re-encrypted
    reply = sender.post("/v1/messages", json={"to": ["bob@example.org"], "subject": "after rotation", "text": "t"})
    url = reply.headers["location"]
    wait_for(lambda: sender.get(url).json()["status"] == "sent", "not sent after the keys were rotated")
    assert operator.http.get("/readyz").json()["checks"]["worker"] == "ok"


def test_a_lost_key_file_is_not_replaced_by_a_new_one(operator: Operator, tmp_path: Path) -> None:
    for name in ("mailgate.db", "mailgate.db-wal", "mailgate.db-shm"):  # a copy of the database, without its keys
        if (operator.served.cwd / name).exists():
            shutil.copy(operator.served.cwd / name, tmp_path / name)
    done = subprocess.run([MAILGATE, "servers", "show", "global"], cwd=tmp_path, env=operator.served.env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0 and "mailgate.db.keys" in done.stderr, done.stderr
    assert not (tmp_path / "mailgate.db.keys").exists()


@pytest.mark.parametrize("host", ["a..b", "．．", "x" * 70 + ".example", "\u00ad.example"])
def test_a_host_that_can_not_be_a_dns_name_is_a_settings_problem_not_a_500(operator: Operator, host: str) -> None:
    # getaddrinfo raises UnicodeError (not OSError) for these: the save must not fail with it.
    tenant, admin, _ = operator.tenant()
    document = {**smtp_server("smtp.tenant.example", 587), "kind": "graph",
                "graph": {"endpoint": f"https://{host}/v1.0", "directory_id": "d", "client_id": "c",
                          "client_secret": "s", "mailbox": "no-reply@tenant.example"}}  # fmt: skip
    document.pop("smtp")
    reply = admin.put(f"/v1/tenants/{tenant}/server", json=document)
    assert reply.status_code == 422, reply.text
    assert "not a valid domain name" in problems(reply)["graph.endpoint"], reply.text


@pytest.mark.parametrize("host", ["a..b", "dead..beef", "a.b..", "1.2.3..4"])
def test_an_smtp_host_that_can_not_be_looked_up_is_refused_at_save(operator: Operator, host: str) -> None:
    tenant, admin, _ = operator.tenant()
    reply = admin.put(f"/v1/tenants/{tenant}/server", json=smtp_server(host, 587))
    assert reply.status_code == 422 and "not a host name" in problems(reply)["smtp.host"], reply.text


async def test_a_name_the_resolver_can_not_encode_does_not_resolve() -> None:
    from mailgate.destinations import Destinations

    with pytest.raises(OSError):
        await Destinations().tenant.resolve("a..b", 443)
