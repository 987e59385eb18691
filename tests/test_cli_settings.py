"""`mailgate tenants|servers|keys|db …` and `send --tenant`, as an operator runs them: the installed
command in a subprocess, a database of the test's own."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from conftest import TEST_KEY
from mailgate import Mailgate
from mailgate.db.engine import SCHEMA_REVISION
from smtp_servers import ServerConfig, serve_in_thread

MAILGATE = str(Path(sys.executable).with_name("mailgate"))
PASSWORD = "cli-pa55word-s3cret"


class CLI:
    def __init__(self, tmp_path: Path, keys: str | None = TEST_KEY, database_url: str | None = None) -> None:
        self.tmp = tmp_path
        self.url = database_url or f"sqlite:///{tmp_path}/mailgate.db"
        self.env = {**os.environ, "MAILGATE_DATABASE_URL": self.url}
        self.env.pop("MAILGATE_SECRET_KEYS", None)
        if keys is not None:
            self.env["MAILGATE_SECRET_KEYS"] = keys

    def __call__(self, *args: str | Path, stdin: str = "", check: int | None = 0) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [MAILGATE, *map(str, args)], input=stdin, capture_output=True, text=True, timeout=60, env=self.env
        )
        if check is not None:
            assert out.returncode == check, f"exit {out.returncode}\n{out.stdout}\n{out.stderr}"
        return out

    def doc(self, name: str = "server.json", **fields: Any) -> Path:
        doc: dict[str, Any] = {
            "from_address": "no-reply@example.com",
            "smtp": {"host": "smtp.example.com", "port": 587, "security": "starttls-required"},
            "auth": {"method": "password", "username": "no-reply@example.com"},
        }
        doc.update(fields)
        path = self.tmp / name
        path.write_text(json.dumps(doc))
        return path


@pytest.fixture
def cli(tmp_path: Path) -> CLI:
    return CLI(tmp_path)


def test_tenant_lifecycle(cli: CLI) -> None:
    added = json.loads(cli("tenants", "add", "acme", "--name", "Acme Corp", "--support-address",
                           "help@acme.example", "--json").stdout)  # fmt: skip
    assert (added["id"], added["name"], added["may_use_own_server"]) == ("acme", "Acme Corp", False)
    cli("tenants", "add", "beta")
    assert "acme" in cli("tenants", "list").stdout and "beta" in cli("tenants", "list").stdout
    updated = json.loads(cli("tenants", "update", "acme", "--may-use-own-server", "--json").stdout)
    assert updated["may_use_own_server"] is True and updated["name"] == "Acme Corp"
    assert "help@acme.example" in cli("tenants", "show", "acme").stdout
    cli("tenants", "remove", "beta")
    assert [t["id"] for t in json.loads(cli("tenants", "list", "--json").stdout)] == ["acme"]


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["tenants", "show", "nope"], "there is no tenant 'nope'"),
        (["tenants", "remove", "nope"], "there is no tenant 'nope'"),
        (["tenants", "add", "global"], "names the global mail server"),
        (["tenants", "add", "bad id"], "a tenant id is"),
        (["servers", "show", "nope"], "there is no tenant 'nope'"),
        (["servers", "resolve", "nope"], "there is no tenant 'nope'"),
        (["send", "--tenant", "nope", "--to", "a@example.org"], "there is no tenant 'nope'"),
    ],
)
def test_unknown_or_bad_tenants_exit_2(cli: CLI, args: list[str], text: str) -> None:
    out = cli(*args, check=2)
    assert text in out.stderr


def test_a_duplicate_tenant_exits_2(cli: CLI) -> None:
    cli("tenants", "add", "acme")
    assert "exists already" in cli("tenants", "add", "acme", check=2).stderr


def test_servers_set_and_show_never_prints_the_secret(cli: CLI) -> None:
    out = cli("servers", "set", "global", "--file", cli.doc(auth={"method": "password", "username": "u",
                                                                    "password": PASSWORD}))  # fmt: skip
    assert "saved the global mail server (version 1)" in out.stdout
    shown = cli("servers", "show", "global")
    shown_json = json.loads(cli("servers", "show", "global", "--json").stdout)
    assert shown_json["server"]["auth"]["password"] == {"set": True}
    assert shown_json["version"] == 1
    for text in (out.stdout, out.stderr, shown.stdout, shown.stderr):
        assert PASSWORD not in text


def test_secrets_from_stdin(cli: CLI) -> None:
    cli("servers", "set", "global", "--file", cli.doc(), "--password-stdin", stdin=PASSWORD + "\n")
    graph = {"kind": "graph", "from_address": "m@example.com",
             "graph": {"directory_id": "d", "client_id": "c", "mailbox": "m@example.com"}}  # fmt: skip
    cli("tenants", "add", "acme")
    path = cli.tmp / "graph.json"
    path.write_text(json.dumps(graph))
    cli("servers", "set", "acme", "--file", path, "--client-secret-stdin", stdin="graph-secret\n")
    shown = json.loads(cli("servers", "show", "acme", "--json").stdout)
    assert shown["server"]["graph"]["client_secret"] == {"set": True}

    async def stored() -> tuple[str, str]:
        async with Mailgate.open(cli.url, secret_keys=TEST_KEY) as mg:
            g = await mg.servers.with_secrets("global")
            a = await mg.servers.with_secrets("acme")
        assert g is not None and a is not None and a.graph is not None and a.graph.client_secret is not None
        return g.auth.password.get_secret_value(), a.graph.client_secret.get_secret_value()  # type: ignore[union-attr]

    assert asyncio.run(stored()) == (PASSWORD, "graph-secret")


def test_a_secret_for_a_server_that_takes_none_exits_2(cli: CLI) -> None:
    out = cli("servers", "set", "global", "--file", cli.doc(), "--client-secret-stdin", stdin="x\n", check=2)
    assert "--client-secret-stdin" in out.stderr and "no client secret" in out.stderr
    no_auth = cli.doc("none.json", auth={"method": "none"})
    out = cli("servers", "set", "global", "--file", no_auth, "--password-stdin", stdin="x\n", check=2)
    assert "auth.password" in out.stderr and "takes no secret" in out.stderr


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("{not json", "is not JSON"),
        (json.dumps({"from_address": "a@example.com", "smtp": {"host": "h", "colour": 1}}),
         "smtp.colour: unknown field"),
        (json.dumps({"from_address": "a@example.com", "smtp": {"host": "h", "port": "25"}}), "smtp.port"),
        (json.dumps({"from_address": "a@example.com", "smtp": {"host": "h"},
                     "auth": {"method": "password", "username": "u"}}), "auth.password: is required"),
    ],
)  # fmt: skip
def test_a_bad_document_exits_2_and_saves_nothing(cli: CLI, content: str, field: str) -> None:
    path = cli.tmp / "bad.json"
    path.write_text(content)
    out = cli("servers", "set", "global", "--file", path, "--json", check=2)
    assert field in out.stdout
    assert json.loads(cli("servers", "show", "global", "--json").stdout) == {"scope": "global", "server": None}


def test_a_changed_host_without_the_password_is_refused(cli: CLI) -> None:
    cli("servers", "set", "global", "--file", cli.doc(), "--password-stdin", stdin=PASSWORD)
    moved = cli.doc(smtp={"host": "evil.example.net", "port": 587, "security": "starttls-required"})
    out = cli("servers", "set", "global", "--file", moved, check=2)
    assert "auth.password: give it again: smtp.host changed" in out.stderr
    cli("servers", "set", "global", "--file", moved, "--password-stdin", stdin="for-the-new-host")


def test_enable_disable_delete_and_resolve(cli: CLI) -> None:
    cli("tenants", "add", "acme")
    cli("servers", "set", "global", "--file", cli.doc(), "--password-stdin", stdin=PASSWORD)
    assert "it uses the global one" in cli("servers", "resolve", "acme").stdout
    assert "is off (version 2)" in cli("servers", "disable", "global").stdout
    assert "sending is disabled for every tenant" in cli("servers", "resolve", "acme").stdout
    assert "is on (version 3)" in cli("servers", "enable", "global").stdout
    cli("servers", "delete", "global")
    assert json.loads(cli("servers", "resolve", "acme", "--json").stdout)["source"] is None
    assert "no mail server is set for global" in cli("servers", "delete", "global", check=2).stderr


def test_keys_rotate_with_keys_from_the_environment(tmp_path: Path) -> None:
    old, new = TEST_KEY, Fernet.generate_key().decode()
    before = CLI(tmp_path, keys=old)
    before("servers", "set", "global", "--file", before.doc(), "--password-stdin", stdin=PASSWORD)
    assert "re-encrypted 1 secret(s)" in CLI(tmp_path, keys=f"{new},{old}")("keys", "rotate").stdout
    after = CLI(tmp_path, keys=new)
    after("tenants", "add", "acme")
    assert "uses the global one" in after("servers", "resolve", "acme").stdout
    assert "cannot decrypt" in CLI(tmp_path, keys=old)("servers", "resolve", "acme", check=1).stderr


def test_without_keys_a_key_file_is_created_and_rotated(tmp_path: Path) -> None:
    cli = CLI(tmp_path, keys=None)
    first = cli("servers", "set", "global", "--file", cli.doc(), "--password-stdin", stdin=PASSWORD)
    key_file = tmp_path / "mailgate.db.keys"
    assert f"created the secret key file {key_file}" in first.stderr
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert "re-encrypted 1 secret(s)" in cli("keys", "rotate", "--new-key").stdout
    keys = [line for line in key_file.read_text().splitlines() if line and not line.startswith("#")]
    assert len(keys) == 2
    only_new = CLI(tmp_path, keys=keys[0])  # the old key is no longer needed
    only_new("tenants", "add", "acme")
    assert "uses the global one" in only_new("servers", "resolve", "acme").stdout


def test_keys_generate_prints_a_fernet_key(cli: CLI) -> None:
    key = cli("keys", "generate").stdout.strip()
    Fernet(key.encode())  # raises if it isn't one


def test_db_upgrade_creates_the_database(cli: CLI) -> None:
    assert f"revision {SCHEMA_REVISION}" in cli("db", "upgrade").stdout
    assert (cli.tmp / "mailgate.db").exists()


def test_several_processes_creating_the_database_at_once(tmp_path: Path) -> None:
    cli = CLI(tmp_path)
    procs = [
        subprocess.Popen([MAILGATE, "tenants", "list"], env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], results


def test_the_database_url_option(tmp_path: Path) -> None:
    cli = CLI(tmp_path)
    other = f"sqlite:///{tmp_path}/other.db"
    cli("--database-url", other, "tenants", "add", "acme")
    assert (tmp_path / "other.db").exists() and not (tmp_path / "mailgate.db").exists()


def test_changes_from_the_cli_are_audited_as_the_cli(cli: CLI) -> None:
    cli("tenants", "add", "acme")

    async def actors() -> list[str]:
        async with Mailgate.open(cli.url, secret_keys=TEST_KEY) as mg:
            return [e.actor for e in await mg.audit_log()]

    (actor,) = asyncio.run(actors())
    assert actor.startswith("cli:")


# ---- send --tenant -----------------------------------------------------------------------------


def test_send_now_through_a_tenants_resolved_server(cli: CLI) -> None:
    cfg = ServerConfig(security="starttls-required", auth=frozenset({"PLAIN"}), password=PASSWORD)
    with serve_in_thread(cfg) as server:
        doc = cli.doc(smtp={"host": server.host, "port": server.port, "security": "starttls-required",
                            "ca_file": str(server.ca_file)},
                      auth={"method": "password", "username": "user@example.com"},
                      connection={"connect_timeout": 5, "protocol_timeout": 5})  # fmt: skip
        cli("tenants", "add", "acme")
        cli("servers", "set", "global", "--file", doc, "--password-stdin", stdin=PASSWORD)
        out = cli("send", "--tenant", "acme", "--now", "--to", "a@example.org", "--subject", "hi", "--text", "x",
                  "--json")  # fmt: skip
        (received,) = server.wait_for_messages_sync(1)
    assert json.loads(out.stdout)["status"] == "sent"
    assert received.mail_from == "no-reply@example.com"
    assert received.auth_login == "user@example.com"


def test_send_now_through_a_tenants_own_server_obeys_the_destination_policy(cli: CLI) -> None:
    with serve_in_thread(ServerConfig()) as server:
        doc = cli.doc(smtp={"host": server.host, "port": server.port, "security": "none"}, auth={"method": "none"})
        cli("tenants", "add", "acme", "--may-use-own-server")
        cli("servers", "set", "global", "--file", doc)
        cli("servers", "set", "acme", "--file", doc)  # saved while the operator allowed loopback
        cli.env["MAILGATE_TENANT_NETWORKS"] = ""  # the default: a tenant's server may not point at loopback
        out = cli("send", "--tenant", "acme", "--now", "--to", "a@example.org", "--text", "x", check=4)
        assert server.connection_count == 0
        cli("tenants", "add", "shared")  # through the global server, which may
        cli("send", "--tenant", "shared", "--now", "--to", "a@example.org", "--text", "x")
        server.wait_for_messages_sync(1)
    assert "127.0.0.1 is a loopback address" in out.stderr and "MAILGATE_TENANT_NETWORKS" in out.stderr


def test_send_when_sending_is_disabled_exits_4_with_the_reason(cli: CLI) -> None:
    cli("tenants", "add", "acme")
    out = cli("send", "--tenant", "acme", "--to", "a@example.org", "--text", "x", check=4)
    assert "global mail server is not set: sending is disabled for every tenant" in out.stderr


def test_send_needs_exactly_one_server_source(cli: CLI) -> None:
    assert "--server FILE or --tenant" in cli("send", "--to", "a@example.org", check=2).stderr
    both = cli("send", "--server", cli.doc(), "--tenant", "acme", "--to", "a@example.org", check=2)
    assert "--server FILE or --tenant" in both.stderr


def test_the_cli_on_postgresql(tmp_path: Path, postgres_schema_url: str) -> None:
    cli = CLI(tmp_path, database_url=postgres_schema_url)
    cli("tenants", "add", "acme")
    cli("servers", "set", "acme", "--file", cli.doc(), "--password-stdin", stdin=PASSWORD)
    assert json.loads(cli("servers", "show", "acme", "--json").stdout)["server"]["auth"]["password"] == {"set": True}
