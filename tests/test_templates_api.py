"""Notification templates end to end: POST /v1/messages with a template, delivered by the worker
to a real SMTP server (aiosmtpd) in the right locale; the template routes and who may use them;
`mailgate send --template` and `mailgate templates …` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from conftest import TEST_KEY
from mailgate.db.models import MessageRow
from smtp_servers import ServerConfig, serve, serve_in_thread
from test_api import FAST, Api, api_of, problems, smtp_doc

MAILGATE = str(Path(sys.executable).with_name("mailgate"))
INVITATION = {"inviter_name": "Ada <Admin>", "organization": "Acme & Co", "accept_url": "https://app.example/a?t=1",
              "expires_at": "1 mei"}  # fmt: skip


class TemplatesApi(Api):
    async def as_role(self, role: str, tenant: str | None = "acme") -> dict[str, str]:
        token, _ = await self.mg.api_tokens.create(role, tenant)
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[TemplatesApi]:
    async with api_of(database_url, FAST, TemplatesApi) as opened:
        await opened.mg.tenants.add("globex")
        yield opened


async def stored(api: Api) -> int:
    async with api.mg.db.sessions() as s:
        return int(await s.scalar(select(func.count()).select_from(MessageRow)) or 0)


async def test_a_template_message_is_delivered_rendered_in_its_locale(api: TemplatesApi) -> None:
    async with serve(ServerConfig()) as smtp:
        await api.mg.servers.set("global", smtp_doc(smtp.host, smtp.port))
        reply = await api.submit({"template": "invitation", "locale": "nl-BE", "data": INVITATION,
                                  "to": ["bob@example.org"]})  # fmt: skip
        assert reply.status_code == 202 and reply.json()["locale"] == "nl", reply.text
        stats = await api.mg.run_worker(until_idle=True)
        (received,) = await smtp.wait_for_messages(1)
    assert stats.sent == 1 and received.rcpt_tos == ["bob@example.org"]
    mail = received.parsed()
    assert mail["Subject"] == "Ada <Admin> nodigt je uit voor Acme & Co"
    text = mail.get_body(("plain",))
    html = mail.get_body(("html",))
    assert text is not None and html is not None
    assert "Ada <Admin> nodigt je uit om lid te worden van Acme & Co." in text.get_content()
    assert "De link is geldig tot 1 mei." in text.get_content()
    page = html.get_content()
    assert '<html lang="nl">' in page and "Uitnodiging accepteren" in page
    assert "Ada &lt;Admin&gt;" in page and "Acme &amp; Co" in page and 'href="https://app.example/a?t=1"' in page


async def test_a_missing_variable_is_a_422_naming_it_and_nothing_is_stored(api: TemplatesApi) -> None:
    data = {k: v for k, v in INVITATION.items() if k != "accept_url"}
    reply = await api.submit({"template": "invitation", "data": {**data, "colour": "red"}, "to": ["b@example.org"]})
    assert reply.status_code == 422 and reply.json()["code"] == "invalid_input"
    assert set(problems(reply)) == {"data.accept_url", "data.colour"}
    assert await stored(api) == 0


@pytest.mark.parametrize(("body", "field"), [
    ({"template": "invitation", "data": INVITATION, "subject": "mine"}, "subject"),
    ({"template": "invitation", "data": INVITATION, "text": "mine"}, "text"),
    ({"subject": "s", "text": "t", "locale": "nl"}, "locale"),
    ({"subject": "s", "text": "t", "data": {"a": "b"}}, "data"),
    ({"template": "no_such", "data": {}}, "template"),
    ({"template": "invitation", "locale": "../../etc", "data": INVITATION}, "locale"),
])  # fmt: skip
async def test_template_and_content_do_not_mix(api: TemplatesApi, body: dict[str, Any], field: str) -> None:
    reply = await api.submit({**body, "to": ["b@example.org"]})
    assert reply.status_code == 422 and field in problems(reply), reply.text
    assert await stored(api) == 0


async def test_a_tenant_admin_overrides_its_own_templates_only(api: TemplatesApi) -> None:
    admin = await api.as_role("tenant-admin")
    body = {"subject": "Acme: {{ organization }}", "text": "Kom erbij: {{ accept_url }}", "html": ""}
    url = "/v1/tenants/acme/templates/invitation/nl"
    assert (await api.client.put(url, json=body, headers=api.sender)).status_code == 403
    assert (await api.client.put("/v1/templates/invitation/nl", json=body, headers=admin)).status_code == 403
    assert (await api.client.put("/v1/tenants/globex/templates/invitation/nl", json=body,
                                 headers=admin)).status_code == 404  # fmt: skip
    saved = await api.client.put(url, json=body, headers=admin)
    assert saved.status_code == 200 and saved.json()["source"] == "tenant"
    shown = (await api.client.get(url, headers=admin)).json()
    assert (shown["subject"], shown["source"], shown["updated_by"]) == (body["subject"], "tenant",
                                                                          "token:3 (tenant-admin of acme)")  # fmt: skip
    listed = (await api.client.get("/v1/templates", headers=admin)).json()["templates"]
    nl = next(s for t in listed if t["name"] == "invitation" for s in t["locales"] if s["locale"] == "nl")
    assert nl == {"locale": "nl", "built_in": True, "global_override": False, "tenant_override": True}
    reply = await api.submit({"template": "invitation", "locale": "nl", "data": INVITATION, "to": ["b@example.org"]})
    message = (await api.client.get(f"/v1/messages/{reply.json()['id']}", headers=api.sender)).json()
    assert message["subject"] == "Acme: Acme & Co"
    reset = await api.client.delete(url, headers=admin)
    assert reset.status_code == 200 and reset.json()["source"] == "built-in"
    assert (await api.client.delete(url, headers=admin)).status_code == 404
    actions = [e.action for e in await api.mg.audit_log("acme")]
    assert actions[:2] == ["template.reset", "template.set"]


async def test_the_system_admin_sets_the_global_defaults(api: TemplatesApi) -> None:
    body = {"subject": "Global {{ organization }}", "text": "{{ accept_url }}", "html": "<p>{{ organization }}</p>"}
    assert (await api.client.put("/v1/templates/invitation/fr", json=body, headers=api.admin)).status_code == 200
    shown = (await api.client.get("/v1/tenants/globex/templates/invitation/fr-CA", headers=api.admin)).json()
    assert (shown["source"], shown["locale"]) == ("global", "fr")
    sender_view = await api.client.get("/v1/tenants/acme/templates/invitation/fr", headers=api.sender)
    assert sender_view.status_code == 200 and sender_view.json()["source"] == "global"


async def test_a_hostile_template_is_a_422_naming_the_part(api: TemplatesApi) -> None:
    body = {"subject": "{{ ''.__class__.__mro__ }}", "text": "{% for a in range(99999) %}{% endfor %}",
            "html": "{{ nope }}"}  # fmt: skip
    reply = await api.client.put("/v1/templates/invitation/en", json=body, headers=api.admin)
    assert reply.status_code == 422 and set(problems(reply)) == {"subject", "text", "html"}
    big = {"subject": "s", "text": "x" * (64 * 1024 + 1), "html": ""}
    assert (await api.client.put("/v1/templates/invitation/en", json=big, headers=api.admin)).status_code in (413, 422)


async def test_preview_renders_unsaved_text_with_the_samples(api: TemplatesApi) -> None:
    reply = await api.client.post("/v1/tenants/acme/templates/access_review/de/preview",
                                  json={"subject": "Bitte {{ review_name }}"}, headers=api.sender)  # fmt: skip
    assert reply.status_code == 200, reply.text
    shown = reply.json()
    assert shown["subject"] == "Bitte Q1 review of finance applications" and shown["source"] == "unsaved"
    assert "24 Zugriffe warten" in shown["text"] and '<html lang="de">' in shown["html"]
    bad = await api.client.post("/v1/templates/invitation/en/preview", json={"data": {"organization": "x"}},
                                headers=api.admin)  # fmt: skip
    assert bad.status_code == 422 and "data.accept_url" in problems(bad)


async def test_a_test_of_a_template_is_queued_for_the_tenant(api: TemplatesApi) -> None:
    admin = await api.as_role("tenant-admin")
    reply = await api.client.post("/v1/tenants/acme/templates/login_details/fr/test",
                                  json={"to": "me@acme.example"}, headers=admin)  # fmt: skip
    assert reply.status_code == 202, reply.text
    message = (await api.client.get(f"/v1/messages/{reply.json()['id']}", headers=admin)).json()
    assert message["subject"] == "Votre compte Acme Corp" and message["tenant"] == "acme"
    assert (await api.client.post("/v1/tenants/acme/templates/login_details/fr/test", json={"to": "me@acme.example"},
                                  headers=api.sender)).status_code == 403  # fmt: skip


# ---- the CLI -----------------------------------------------------------------------------------


def server_file(tmp_path: Path, host: str, port: int) -> Path:
    doc = tmp_path / "server.json"
    doc.write_text(json.dumps({"kind": "smtp", "enabled": True, "from_address": "no-reply@example.com",
                               "smtp": {"host": host, "port": port, "security": "none"}}))  # fmt: skip
    return doc


def cli(tmp_path: Path, *args: str | Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MAILGATE_DATABASE_URL": f"sqlite:///{tmp_path}/mailgate.db", "MAILGATE_SECRET_KEYS": TEST_KEY}
    return subprocess.run([MAILGATE, *map(str, args)], input=stdin, capture_output=True, text=True, timeout=60,
                          env=env)  # fmt: skip


def test_cli_overrides_and_sends_a_template(tmp_path: Path) -> None:
    with serve_in_thread(ServerConfig()) as server:
        assert cli(tmp_path, "tenants", "add", "acme").returncode == 0
        doc = server_file(tmp_path, server.host, server.port)
        assert cli(tmp_path, "servers", "set", "global", "--file", doc).returncode == 0
        (tmp_path / "body.txt").write_text("Bonjour de la part d'Acme : {{ reset_url }}\n")
        out = cli(tmp_path, "templates", "set", "password_reset", "fr", "--tenant", "acme",
                  "--subject", "Acme : mot de passe", "--text-file", tmp_path / "body.txt")  # fmt: skip
        assert out.returncode == 0, out.stderr
        listed = cli(tmp_path, "templates", "list", "--tenant", "acme").stdout
        assert "fr[T]" in next(line for line in listed.splitlines() if line.startswith("password_reset"))
        data = tmp_path / "data.json"
        data.write_text(json.dumps({"organization": "Acme", "reset_url": "https://r.example/1", "expires_at": "15:00"}))
        out = cli(tmp_path, "send", "--tenant", "acme", "--now", "--template", "password_reset", "--locale", "fr-BE",
                  "--data-file", data, "--to", "bob@example.org", "--json")  # fmt: skip
        assert out.returncode == 0, out.stderr
        (received,) = server.wait_for_messages_sync(1)
    mail = received.parsed()
    assert mail["Subject"] == "Acme : mot de passe"
    assert mail.get_content_type() == "text/plain"  # the override has no HTML
    assert mail.get_content().rstrip() == "Bonjour de la part d'Acme : https://r.example/1"


def test_cli_send_names_a_missing_variable_and_stores_nothing(tmp_path: Path) -> None:
    assert cli(tmp_path, "tenants", "add", "acme").returncode == 0
    out = cli(tmp_path, "send", "--tenant", "acme", "--template", "invitation", "--data", '{"organization": "A"}',
              "--to", "bob@example.org", "--json")  # fmt: skip
    assert out.returncode == 2
    fields = {p["field"] for p in json.loads(out.stdout)["error"]["problems"]}
    assert fields == {"data.inviter_name", "data.accept_url", "data.expires_at"}
    assert "queued" not in cli(tmp_path, "queue", "list").stdout
    both = cli(tmp_path, "send", "--tenant", "acme", "--template", "invitation", "--subject", "x", "--to", "b@e.org")
    assert both.returncode == 2 and "leave out --subject" in both.stderr
    assert cli(tmp_path, "servers", "set", "global", "--file", server_file(tmp_path, "127.0.0.1", 2525)).returncode == 0
    sample = {"inviter_name": "A", "organization": "B", "accept_url": "https://c.example", "expires_at": "D"}
    queued = cli(tmp_path, "send", "--tenant", "acme", "--template", "invitation", "--locale", "de-AT", "--data",
                 json.dumps(sample), "--to", "bob@example.org", "--json")  # fmt: skip
    assert queued.returncode == 0, queued.stderr
    assert json.loads(queued.stdout)["locale"] == "de" and json.loads(queued.stdout)["status"] == "queued"


def test_cli_send_with_a_server_file_uses_the_built_in_template(tmp_path: Path) -> None:
    with serve_in_thread(ServerConfig()) as server:
        doc = server_file(tmp_path, server.host, server.port)
        data = {"import_name": "HR", "failed_at": "heute", "details_url": "https://r.example/9", "errors": ["Zeile 3"]}
        out = cli(tmp_path, "send", "--server", doc, "--template", "import_failed", "--locale", "de",
                  "--data-file", "-", "--to", "ops@example.org", stdin=json.dumps(data))  # fmt: skip
        assert out.returncode == 0, out.stderr
        (received,) = server.wait_for_messages_sync(1)
    mail = received.parsed()
    assert mail["Subject"] == "Import fehlgeschlagen: HR"
    body = mail.get_body(("plain",))
    assert body is not None and "- Zeile 3" in body.get_content()
