"""The mail server document: DESIGN.md's examples parse, defaults are safe, and every bad field is
named in the error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mailgate import SettingsError
from mailgate.settings import load_server, parse_server
from mailgate.settings.document import OAuth2AuthSettings, PasswordAuthSettings
from mailgate.transports.smtp import smtp_config

# The three examples of DESIGN.md, as written there (with the "…" placeholders filled in).
DESIGN_SMTP = {
    "kind": "smtp", "enabled": True,
    "from_address": "no-reply@example.com", "from_name": "Example",
    "smtp": {"host": "smtp.example.com", "port": 587, "security": "starttls-required",
             "verify_certificate": True, "ca_file": None, "utf8_headers": True},
    "auth": {"method": "password", "username": "u", "password": "p", "mechanism": "auto"},
}  # fmt: skip
DESIGN_OAUTH2_AUTH = {
    "method": "oauth2", "username": "mailbox@example.com",
    "token": {"grant": "client_credentials", "provider": "microsoft",
              "authority": "https://login.microsoftonline.com", "directory_id": "contoso-id",
              "client_id": "app-id", "client_secret": "secret-value",
              "token_url": None, "scope": "https://outlook.office365.com/.default"},
}  # fmt: skip
DESIGN_GRAPH = {
    "kind": "graph", "enabled": True, "from_address": "no-reply@example.com",
    "graph": {"authority": "https://login.microsoftonline.com", "endpoint": "https://graph.microsoft.com",
              "directory_id": "contoso-id", "client_id": "app-id", "client_secret": "secret-value",
              "mailbox": "no-reply@example.com", "allow_delegate": False, "save_to_sent_items": True,
              "large_attachments": False},
}  # fmt: skip


def test_design_examples_parse() -> None:
    smtp = parse_server(DESIGN_SMTP)
    assert smtp.smtp is not None and smtp.smtp.host == "smtp.example.com"
    assert isinstance(smtp.auth, PasswordAuthSettings) and smtp.auth.password is not None
    oauth = parse_server({**DESIGN_SMTP, "auth": DESIGN_OAUTH2_AUTH})
    assert isinstance(oauth.auth, OAuth2AuthSettings) and oauth.auth.token.grant == "client_credentials"
    graph = parse_server(DESIGN_GRAPH)
    assert graph.graph is not None and graph.graph.mailbox == "no-reply@example.com"


def test_connection_quota_and_debug_sections() -> None:
    doc = {
        **DESIGN_SMTP,
        "connection": {"pool_size": 3, "check_idle_after": 30, "max_idle": 300, "connect_timeout": 10,
                       "protocol_timeout": 20.5, "token_expiry_margin": 300, "max_messages_per_connection": 100},
        "quota": {"messages_per_minute": 30, "recipients_per_day": 10000, "max_concurrent_connections": 3},
        "debug": {"protocol_log": True},
        "reply_to": "support@example.com",
        "envelope_from": "bounces@example.com",
    }  # fmt: skip
    server = parse_server(doc)
    assert server.connection.protocol_timeout == 20.5
    assert server.quota.max_concurrent_connections == 3
    assert server.debug.protocol_log
    assert server.envelope_from == "bounces@example.com"


def test_defaults_are_the_safe_ones() -> None:
    server = parse_server({"from_address": "a@example.com", "smtp": {"host": "smtp.example.com"}})
    assert server.kind == "smtp" and server.enabled
    assert server.smtp is not None
    assert server.smtp.security == "starttls-required"
    assert server.smtp.effective_port == 587
    assert server.smtp.verify_certificate
    assert not server.smtp.utf8_headers
    assert server.auth.method == "none"
    assert server.connection.pool_size == 10 and server.connection.check_idle_after == 30


def test_implicit_tls_defaults_to_port_465() -> None:
    server = parse_server({"from_address": "a@example.com", "smtp": {"host": "h", "security": "tls"}})
    assert smtp_config(server).port == 465


def test_a_secret_never_shows_in_the_model_repr() -> None:
    server = parse_server(DESIGN_SMTP)
    assert "'p'" not in repr(server)
    oauth = parse_server({**DESIGN_SMTP, "auth": DESIGN_OAUTH2_AUTH})
    assert "secret-value" not in repr(oauth) and "secret-value" not in str(oauth.model_dump())


def with_changes(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(base))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key].update(value)
        else:
            doc[key] = value
    return doc


@pytest.mark.parametrize(
    ("doc", "field", "text"),
    [
        (with_changes(DESIGN_SMTP, smtp={"host": ""}), "smtp.host", "at least 1"),
        ({"from_address": "a@example.com", "smtp": {"port": 25}}, "smtp.host", "required"),
        (with_changes(DESIGN_SMTP, smtp={"port": 0}), "smtp.port", "greater than or equal to 1"),
        (with_changes(DESIGN_SMTP, smtp={"port": 65536}), "smtp.port", "less than or equal to 65535"),
        (with_changes(DESIGN_SMTP, smtp={"port": "587"}), "smtp.port", "valid integer"),
        (with_changes(DESIGN_SMTP, smtp={"port": 465}), "smtp", "port 465 speaks implicit TLS"),
        (with_changes(DESIGN_SMTP, smtp={"security": "ssl"}), "smtp.security", "'starttls-required'"),
        (with_changes(DESIGN_SMTP, smtp={"verify_certificate": "no"}), "smtp.verify_certificate", "valid boolean"),
        (with_changes(DESIGN_SMTP, smtp={"hostname": "x"}), "smtp.hostname", "unknown field"),
        (with_changes(DESIGN_SMTP, colour="blue"), "colour", "unknown field"),
        (with_changes(DESIGN_SMTP, from_address="not-an-address"), "from_address", "not a valid address"),
        (with_changes(DESIGN_SMTP, from_name="A\r\nBcc: x@example.com"), "from_name", "line breaks"),
        (with_changes(DESIGN_SMTP, auth={"method": "oauth2", "username": "u"}), "auth.token", "required"),
        (with_changes(DESIGN_SMTP, auth={"method": "kerberos"}), "auth", "method must be one of"),
        (with_changes(DESIGN_SMTP, auth={"mechanism": "NTLM"}), "auth.mechanism", "'CRAM-MD5'"),
        (with_changes(DESIGN_SMTP, connection={"pool_size": 0}), "connection.pool_size", "greater than"),
        (with_changes(DESIGN_SMTP, connection={"protocol_timeout": -1}), "connection.protocol_timeout", "greater"),
        ({"kind": "graph", "from_address": "a@example.com"}, "", "needs a graph section"),
        (with_changes(DESIGN_GRAPH, smtp={"host": "h"}), "", "belong to kind smtp"),
        (with_changes(DESIGN_GRAPH, graph={"mailbox": ""}), "graph.mailbox", "at least 1"),
    ],
)
def test_each_bad_field_is_named(doc: dict[str, Any], field: str, text: str) -> None:
    with pytest.raises(SettingsError) as e:
        parse_server(doc)
    assert any(f == field and text in problem for f, problem in e.value.problems), e.value.problems


def test_every_problem_is_reported_at_once() -> None:
    doc = with_changes(DESIGN_SMTP, from_address="bad", smtp={"port": 0, "extra": 1})
    with pytest.raises(SettingsError) as e:
        parse_server(doc)
    assert {f for f, _ in e.value.problems} == {"from_address", "smtp.port", "smtp.extra"}


def test_load_server_reports_bad_json_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "server.json"
    path.write_text('{"from_address": ')
    with pytest.raises(SettingsError, match="not valid JSON"):
        load_server(path)
    with pytest.raises(SettingsError, match="cannot read"):
        load_server(tmp_path / "missing.json")


def test_password_method_without_any_password_is_refused_when_sending() -> None:
    server = parse_server(with_changes(DESIGN_SMTP, auth={"method": "password", "username": "u", "password": None}))
    with pytest.raises(SettingsError, match=r"auth\.password"):
        smtp_config(server)
    assert smtp_config(server, password="from-stdin").auth is not None


# ---- bounds: no value a tenant sends may break a protocol line, the database or a worker -------

_OAUTH_SMTP = {**DESIGN_SMTP, "auth": DESIGN_OAUTH2_AUTH}


def _with(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    *parents, name = path.split(".")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
    node[name] = value
    return doc


# Every text field of the document, in a document where it belongs.
TEXT_FIELDS = [
    (DESIGN_SMTP, "from_name"), (DESIGN_SMTP, "smtp.host"), (DESIGN_SMTP, "smtp.helo_name"),
    (DESIGN_SMTP, "smtp.ca_file"), (DESIGN_SMTP, "auth.username"), (DESIGN_SMTP, "auth.password"),
    (_OAUTH_SMTP, "auth.username"), (_OAUTH_SMTP, "auth.token.directory_id"), (_OAUTH_SMTP, "auth.token.client_id"),
    (_OAUTH_SMTP, "auth.token.client_secret"), (_OAUTH_SMTP, "auth.token.scope"),
    (_OAUTH_SMTP, "auth.token.refresh_token"), (DESIGN_GRAPH, "graph.directory_id"),
    (DESIGN_GRAPH, "graph.client_id"), (DESIGN_GRAPH, "graph.client_secret"), (DESIGN_GRAPH, "graph.mailbox"),
]  # fmt: skip


@pytest.mark.parametrize("bad", ["a\x00b", "\ud800", "a\udfffb", "a\x1b[31mb", "a\rb", "a\x7fb", "a\u0085b"])
@pytest.mark.parametrize(("doc", "field"), TEXT_FIELDS)
def test_control_characters_and_lone_surrogates_are_refused_in_every_text_field(
    doc: dict[str, Any], field: str, bad: str
) -> None:
    with pytest.raises(SettingsError) as e:
        parse_server(_with(doc, field, bad))
    assert [f for f, _ in e.value.problems] == [field]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("quota.max_concurrent_connections", 10**30), ("quota.max_concurrent_connections", 1001),
        ("quota.messages_per_minute", 10**12), ("quota.recipients_per_day", 10**12),
        ("connection.max_messages_per_connection", 10**9), ("connection.connect_timeout", 86400),
        ("connection.protocol_timeout", 86400), ("connection.protocol_timeout", 601),
        ("connection.max_idle", 86400), ("connection.check_idle_after", 86400),
        ("connection.token_expiry_margin", 86400), ("auth.password", "p" * 20_000), ("auth.username", "u" * 600),
        ("smtp.host", "h" * 300), ("smtp.host", "smtp.example.com/path"), ("smtp.host", "-smtp.example.com"),
        ("smtp.host", "smtp example.com"), ("smtp.host", "[127.0.0.1]"), ("smtp.ca_file", "/" * 5000),
    ],
)  # fmt: skip
def test_numbers_and_texts_are_bounded(field: str, value: Any) -> None:
    with pytest.raises(SettingsError) as e:
        parse_server(_with(DESIGN_SMTP, field, value))
    assert [f for f, _ in e.value.problems] == [field]


@pytest.mark.parametrize("host", ["smtp.example.com", "bücher.example", "127.0.0.1", "2001:db8::25", "mx-1.example."])
def test_host_names_and_addresses_are_accepted(host: str) -> None:
    assert parse_server(_with(DESIGN_SMTP, "smtp.host", host)).smtp.host == host  # type: ignore[union-attr]


def test_a_ca_certificate_is_pem_text() -> None:
    from certs import make_ca

    server = parse_server(_with(DESIGN_SMTP, "smtp.ca_certificate", make_ca().cert_pem.decode()))
    assert server.smtp is not None and "BEGIN CERTIFICATE" in (server.smtp.ca_certificate or "")
    for bad in ("/etc/ssl/certs/ca-certificates.crt", "-----BEGIN CERTIFICATE-----\nnot base64\n", "x" * 300_000):
        with pytest.raises(SettingsError) as e:
            parse_server(_with(DESIGN_SMTP, "smtp.ca_certificate", bad))
        assert [f for f, _ in e.value.problems] == ["smtp.ca_certificate"]
