"""`mailgate send`: the installed console script in a subprocess, against real servers running in
a background thread. Exit status 0 all accepted, 1 some refused, 2 bad input, 3 transient,
4 permanent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from smtp_servers import RecordingServer, ServerConfig, serve_in_thread

MAILGATE = str(Path(sys.executable).with_name("mailgate"))
PASSWORD = "pa55-w0rd-never-shown"
USER = "user@example.com"


def server_doc(server: RecordingServer, tmp_path: Path, **changes: Any) -> Path:
    doc: dict[str, Any] = {
        "kind": "smtp",
        "from_address": "no-reply@example.com",
        "from_name": "Example Notifications",
        "smtp": {"host": server.host, "port": server.port, "security": server.config.security},
        "connection": {"connect_timeout": 5, "protocol_timeout": 5},
    }
    if server.ca_file:
        doc["smtp"]["ca_file"] = str(server.ca_file)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    path = tmp_path / "server.json"
    path.write_text(json.dumps(doc))
    return path


def run(*args: str | Path, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MAILGATE, "send", *map(str, args)], input=stdin, capture_output=True, text=True, timeout=60, env=env
    )


def test_send_delivers_and_exits_0_with_json_outcome(tmp_path: Path) -> None:
    html = tmp_path / "body.html"
    html.write_text("<p>Your review is due</p>")
    report = tmp_path / "report.csv"
    report.write_bytes(b"user,access\r\nalice,admin\r\n")
    with serve_in_thread(ServerConfig(pipelining=True)) as server:
        out = run(
            "--server", server_doc(server, tmp_path), "--to", "alice@example.org", "--bcc", "audit@example.com",
            "--subject", "Access review", "--text", "Your review is due", "--html-file", html,
            "--attach", report, "--header", "X-Tenant: acme", "--json",
        )  # fmt: skip
        (received,) = server.wait_for_messages_sync(1)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "sent"
    assert result["server"] == f"127.0.0.1:{server.port}"
    assert [(r["recipient"], r["outcome"], r["code"]) for r in result["recipients"]] == [
        ("alice@example.org", "accepted", 250),
        ("audit@example.com", "accepted", 250),
    ]
    parsed = received.parsed()
    assert parsed["Message-ID"] == result["message_id"]
    assert parsed["From"].addresses[0].display_name == "Example Notifications"
    assert parsed["X-Tenant"] == "acme"
    assert parsed["Bcc"] is None
    (attachment,) = parsed.iter_attachments()
    assert attachment.get_filename() == "report.csv"
    assert attachment.get_payload(decode=True) == report.read_bytes()


def test_some_recipients_refused_exits_1(tmp_path: Path) -> None:
    def refuse(address: str, index: int) -> str | None:
        return "550 5.1.1 User unknown" if address.startswith("bad") else None

    with serve_in_thread(ServerConfig(rcpt_reply=refuse)) as server:
        out = run("--server", server_doc(server, tmp_path), "--to", "good@example.org", "--to", "bad@example.org")
    assert out.returncode == 1
    assert "accepted  good@example.org  250" in out.stdout
    assert "permanent bad@example.org  550 5.1.1 User unknown" in out.stdout


@pytest.mark.parametrize(
    ("changes", "args", "field"),
    [
        ({"smtp": {"prot": 1}}, [], "smtp.prot"),
        ({"smtp": {"port": "587"}}, [], "smtp.port"),
        ({"smtp": {"port": 465, "security": "starttls-required"}}, [], "smtp"),
        ({"auth": {"method": "oauth2", "username": USER}}, [], "auth.token"),
        ({}, ["--to", "not-an-address"], "to[0]"),
        ({}, ["--to", "a@example.org", "--subject", "x\r\nBcc: victim@example.org"], "subject"),
        ({}, [], "to"),
    ],
)
def test_bad_input_exits_2_naming_the_field(
    tmp_path: Path, changes: dict[str, Any], args: list[str], field: str
) -> None:
    with serve_in_thread(ServerConfig()) as server:
        out = run("--server", server_doc(server, tmp_path, **changes), *args, "--json")
        assert server.connection_count == 0
    assert out.returncode == 2, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "invalid"
    assert field in [p["field"] for p in result["error"]["problems"]]


def test_a_switched_off_server_is_not_used(tmp_path: Path) -> None:
    with serve_in_thread(ServerConfig()) as server:
        out = run("--server", server_doc(server, tmp_path, enabled=False), "--to", "a@example.org")
        assert server.connection_count == 0
    assert out.returncode == 2
    assert '"enabled": false' in out.stderr


def test_a_body_file_that_is_not_utf8_exits_2(tmp_path: Path) -> None:
    body = tmp_path / "body.txt"
    body.write_bytes(b"caf\xe9")  # Latin-1
    with serve_in_thread(ServerConfig()) as server:
        out = run("--server", server_doc(server, tmp_path), "--to", "a@example.org", "--text-file", body)
    assert out.returncode == 2
    assert "UTF-8" in out.stderr


def test_a_missing_server_file_exits_2(tmp_path: Path) -> None:
    out = run("--server", tmp_path / "nope.json", "--to", "a@example.org")
    assert out.returncode == 2
    assert "cannot read" in out.stderr and "nope.json" in out.stderr


def test_a_transient_refusal_exits_3(tmp_path: Path) -> None:
    with serve_in_thread(ServerConfig(data_reply=lambda m: "451 4.3.0 Try again later")) as server:
        out = run("--server", server_doc(server, tmp_path), "--to", "a@example.org", "--json")
    assert out.returncode == 3
    assert json.loads(out.stdout)["recipients"][0]["enhanced"] == "4.3.0"


def test_an_unreachable_server_exits_3(tmp_path: Path) -> None:
    with serve_in_thread(ServerConfig()) as server:
        doc = server_doc(server, tmp_path)
    out = run("--server", doc, "--to", "a@example.org", "--json")
    assert out.returncode == 3
    error = json.loads(out.stdout)["error"]
    assert error["type"] == "SMTPConnectError" and "cannot connect" in error["message"]


def test_a_permanent_refusal_exits_4(tmp_path: Path) -> None:
    with serve_in_thread(ServerConfig(rcpt_reply=lambda a, i: "550 5.7.1 Relaying denied")) as server:
        out = run("--server", server_doc(server, tmp_path), "--to", "a@example.org")
    assert out.returncode == 4
    assert "Relaying denied" in out.stdout


def test_starttls_required_against_a_plain_server_exits_4(tmp_path: Path) -> None:
    with serve_in_thread(ServerConfig(security="none")) as server:
        doc = server_doc(server, tmp_path, smtp={"security": "starttls-required"})
        out = run("--server", doc, "--to", "a@example.org")
    assert out.returncode == 4
    assert "does not offer STARTTLS" in out.stderr


def password_server() -> ServerConfig:
    return ServerConfig(security="starttls-required", auth=frozenset({"PLAIN", "LOGIN"}), password=PASSWORD)


def test_password_from_stdin_is_used_and_never_shown(tmp_path: Path) -> None:
    with serve_in_thread(password_server()) as server:
        doc = server_doc(server, tmp_path, auth={"method": "password", "username": USER})
        out = run("--server", doc, "--to", "a@example.org", "--password-stdin", "--protocol-log", stdin=PASSWORD + "\n")
        (received,) = server.wait_for_messages_sync(1)
    assert out.returncode == 0, out.stderr
    assert received.auth_login == USER
    assert "C: AUTH PLAIN [redacted]" in out.stderr
    assert PASSWORD not in out.stdout + out.stderr


def test_password_from_the_environment(tmp_path: Path) -> None:
    import os

    with serve_in_thread(password_server()) as server:
        doc = server_doc(server, tmp_path, auth={"method": "password", "username": USER})
        env = {**os.environ, "MAILGATE_SMTP_PASSWORD": PASSWORD}
        out = run("--server", doc, "--to", "a@example.org", env=env)
    assert out.returncode == 0, out.stderr


def test_wrong_password_exits_4_without_showing_it(tmp_path: Path) -> None:
    with serve_in_thread(password_server()) as server:
        doc = server_doc(server, tmp_path, auth={"method": "password", "username": USER, "password": "wrong-one"})
        out = run("--server", doc, "--to", "a@example.org", "--json", "--protocol-log")
    assert out.returncode == 4
    error = json.loads(out.stdout)["error"]
    assert (error["type"], error["code"]) == ("SMTPAuthError", 535)
    assert "wrong-one" not in out.stdout + out.stderr


def test_xoauth2_with_an_access_token_from_stdin(tmp_path: Path) -> None:
    token = "eyJ0eXAiOiJKV1QiLCJhbGciOi-not-a-real-token"
    cfg = ServerConfig(security="tls", auth=frozenset({"XOAUTH2"}), tokens=frozenset({token}))
    with serve_in_thread(cfg) as server:
        doc = server_doc(
            server,
            tmp_path,
            auth={
                "method": "oauth2",
                "username": USER,
                "token": {
                    "grant": "client_credentials",
                    "provider": "microsoft",
                    "directory_id": "t",
                    "client_id": "c",
                },
            },
        )
        out = run("--server", doc, "--to", "a@example.org", "--access-token-stdin", "--protocol-log", stdin=token)
        (received,) = server.wait_for_messages_sync(1)
    assert out.returncode == 0, out.stderr
    assert received.auth_mechanism == "XOAUTH2"
    assert token not in out.stderr


def test_two_readers_of_stdin_are_refused(tmp_path: Path) -> None:
    out = run("--server", tmp_path / "x.json", "--to", "a@example.org", "--password-stdin", "--text-file", "-")
    assert out.returncode == 2
    assert "can read stdin" in out.stderr


def test_help_lists_send() -> None:
    out = subprocess.run([MAILGATE, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert "send" in out.stdout
