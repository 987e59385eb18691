"""The test e-mail: every step against real servers on 127.0.0.1, the dry run, each failure named
with its cause and fix, and stored secrets never sent to a changed destination (Keycloak #39486)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import certs
from conftest import TEST_KEY
from fakes.graph import FakeGraph
from fakes.identity import FakeIdentityProvider
from mailgate import Mailgate, SettingsError
from mailgate.config import Config
from smtp_servers import RecordingServer, ServerConfig, scripted, serve, serve_in_thread

PASSWORD = "correct horse battery staple"
TO = "admin@acme.example"


@pytest.fixture
async def mg(tmp_path: Path) -> AsyncIterator[Mailgate]:
    config = Config(tenant_networks="loopback")  # the test servers are on 127.0.0.1
    async with Mailgate.open(f"sqlite:///{tmp_path}/m.db", secret_keys=TEST_KEY, actor="admin", config=config) as m:
        await m.tenants.add("acme", may_use_own_server=True)
        yield m


def doc(server: RecordingServer, *, security: str = "starttls-required", auth: dict[str, Any] | None = None,
        host: str | None = None, port: int | None = None, **smtp: Any) -> dict[str, Any]:  # fmt: skip
    return {"kind": "smtp", "from_address": "no-reply@acme.example",
            "smtp": {"host": host or server.host, "port": port or server.port, "security": security,
                     "ca_certificate": server.ca_file.read_text() if server.ca_file else None, **smtp},
            "auth": auth if auth is not None else {"method": "password", "username": "user@example.com",
                                                   "password": PASSWORD},
            "connection": {"connect_timeout": 3, "protocol_timeout": 5}}  # fmt: skip


def steps(report: Any) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in report.to_dict()["steps"]}


STARTTLS_AUTH = ServerConfig(security="starttls-required", auth={"PLAIN", "LOGIN"})


async def test_every_step_reports_what_it_found(mg: Mailgate) -> None:
    async with serve(STARTTLS_AUTH) as server:
        await mg.servers.set("acme", doc(server))
        report = await mg.test_server("acme", TO)
        assert [m.rcpt_tos for m in server.messages] == [[TO]]
    found = steps(report)
    assert report.ok and list(found) == ["resolve settings", "dns", "connect", "greeting", "ehlo", "tls", "token",
                                         "auth", "mail from", "rcpt to", "data", "queued"]  # fmt: skip
    assert all(s["status"] == "ok" for n, s in found.items() if n != "token")
    assert found["token"]["status"] == "skipped"
    assert found["dns"]["details"]["addresses"] == ["127.0.0.1"]
    assert found["greeting"]["details"]["reply"].startswith("220")
    assert any(c.startswith("STARTTLS") for c in found["ehlo"]["details"]["capabilities"])
    tls = found["tls"]["details"]
    assert (
        tls["version"] in ("TLSv1.2", "TLSv1.3") and tls["verified"] is True and tls["issuer"] == "CN=mailgate test CA"
    )
    assert tls["expires"] and tls["subject"] and "127.0.0.1" in tls["names"]
    assert (
        sorted(found["auth"]["details"]["offered"]) == ["LOGIN", "PLAIN"]
        and found["auth"]["details"]["used"] == "PLAIN"
    )
    assert found["data"]["details"]["reply"].startswith("250")
    assert found["queued"]["details"]["queue_id"]
    assert PASSWORD not in str(report.to_dict())


async def test_dry_run_delivers_nothing(mg: Mailgate) -> None:
    async with serve(STARTTLS_AUTH) as server:
        await mg.servers.set("global", doc(server))
        report = await mg.test_server("global", TO, dry_run=True)
        assert server.messages == [] and "RSET" in server.commands
    found = steps(report)
    assert report.ok and found["rcpt to"]["status"] == "ok"
    assert found["data"]["status"] == "skipped" and "nothing was delivered" in found["data"]["details"]["skipped"]


async def test_a_wrong_password_fails_at_auth_and_stops(mg: Mailgate) -> None:
    async with serve(STARTTLS_AUTH) as server:
        await mg.servers.set("acme", doc(server, auth={"method": "password", "username": "user@example.com",
                                                       "password": "wrong"}))  # fmt: skip
        report = await mg.test_server("acme", TO)
    found = steps(report)
    assert not report.ok and report.failed is not None and report.failed.name == "auth"
    assert found["auth"]["cause"] and "password" in found["auth"]["fix"]
    assert [found[n]["status"] for n in ("mail from", "rcpt to", "data", "queued")] == ["skipped"] * 4


async def _report(mg: Mailgate, server: RecordingServer, **kw: Any) -> dict[str, Any]:
    await mg.servers.set("acme", doc(server, **kw))
    report = (await mg.test_server("acme", TO)).to_dict()
    failed = next(s for s in report["steps"] if s["status"] == "failed")
    return failed


async def test_dns_failure(mg: Mailgate) -> None:
    async with serve(STARTTLS_AUTH) as server:
        failed = await _report(mg, server, host="smtp.does-not-exist.invalid")
    assert failed["name"] == "dns" and "does not resolve" in failed["cause"] and "smtp.host" in failed["fix"]


async def test_connection_refused(mg: Mailgate) -> None:
    async with serve(STARTTLS_AUTH) as server:
        port = server.port
    async with serve(STARTTLS_AUTH) as other:  # a server only to make the document; the port above is closed
        failed = await _report(mg, other, port=port)
    assert failed["name"] == "connect" and "Nothing accepted the connection" in failed["cause"]
    assert "smtp.port" in failed["fix"]


async def test_starttls_required_but_not_offered(mg: Mailgate) -> None:
    async with serve(ServerConfig(security="none", auth={"PLAIN"}, auth_require_tls=False)) as server:
        failed = await _report(mg, server)
    assert failed["name"] == "tls" and "does not offer STARTTLS" in failed["cause"]


async def test_an_unverified_certificate_is_still_described(mg: Mailgate) -> None:
    async with serve(STARTTLS_AUTH) as server:
        await mg.servers.set("acme", doc(server, verify_certificate=False, ca_certificate=None))
        report = await mg.test_server("acme", TO, dry_run=True)
    tls = steps(report)["tls"]["details"]
    assert report.ok and tls["verified"] == "not checked (verify_certificate is off)"
    assert tls["issuer"] == "CN=mailgate test CA" and tls["expires"]


async def test_untrusted_certificate(mg: Mailgate) -> None:
    async with serve(STARTTLS_AUTH) as server:
        await mg.servers.set("acme", {**doc(server), "smtp": {**doc(server)["smtp"], "ca_certificate": None}})
        failed = next(s for s in (await mg.test_server("acme", TO)).to_dict()["steps"] if s["status"] == "failed")
    assert failed["name"] == "tls" and "not signed by a trusted authority" in failed["cause"]
    assert "ca_file" in failed["fix"]


@pytest.mark.parametrize(("case", "words"), [("wrong host", "another host name"), ("expired", "has expired")])
async def test_wrong_host_and_expired_certificates(mg: Mailgate, tmp_path: Path, case: str, words: str) -> None:
    ca = certs.make_ca("mailgate bad-cert CA")
    bad = {"wrong host": ca.issue(hostnames=["wrong.example"], ips=[]),
           "expired": ca.issue(not_before=certs.days_ago(30), not_after=certs.days_ago(1))}[case]  # fmt: skip
    config = ServerConfig(security="starttls-required", auth={"PLAIN"}, ssl_context=bad.server_context(),
                          ca_file=ca.write(tmp_path))  # fmt: skip
    async with serve(config) as server:
        failed = await _report(mg, server)
    assert failed["name"] == "tls" and words in failed["cause"]


async def test_implicit_tls_against_a_plain_port(mg: Mailgate) -> None:
    async with serve(ServerConfig(security="none")) as server:
        failed = await _report(mg, server, security="tls", auth={"method": "none"})
    assert failed["name"] == "connect"
    assert "plain SMTP port" in failed["cause"] or "did not answer" in failed["cause"]


# Every SMTP entry of the catalogue, provoked against a real server: (where the server says it, its
# reply, the step that fails, words of the explanation). A test below checks none is missing.
# fmt: off
SMTP_CASES = [
    ("auth_failure", "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. "
     "Visit https://aka.ms/smtp_auth_disabled for more information.", "auth", "SMTP AUTH off"),
    ("auth_failure", "535 5.7.139 Authentication unsuccessful, the user credentials were incorrect, user is locked by "
     "your organization's security defaults policy", "auth", "Security defaults"),
    ("auth_failure", "535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be "
     "authenticated successfully", "auth", "Conditional Access"),
    ("auth_failure", "535 5.7.3 Authentication unsuccessful", "auth", "refused the credentials"),
    ("auth_failure", "535-5.7.8 Username and Password not accepted. For more information, go to\r\n"
     "535 5.7.8  https://support.google.com/mail/?p=BadCredentials", "auth", "user name and password"),
    ("auth_failure", "504 5.7.4 Unrecognized authentication type", "auth", "does not accept this authentication"),
    ("auth_failure", "550 5.7.30 Basic authentication is not supported for Client Submission", "auth",
     "no longer accepts passwords"),
    ("mail_reply", "530 5.7.57 Client not authenticated to send mail", "mail from", "without authentication"),
    ("mail_reply", "550 5.7.60 SMTP; Client does not have permissions to send as this sender", "mail from",
     "may not send as"),
    ("data_reply", "554 5.2.252 SendAsDenied; no-reply@acme.example not allowed to send as x", "data",
     "may not send as"),
    ("mail_reply", "421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to support "
     "TLS 1.2", "mail from", "TLS 1.0 and 1.1"),
    ("mail_reply", "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded", "mail from",
     "too many SMTP connections"),
    ("rcpt_reply", "452 4.5.3 Too many recipients", "rcpt to", "Too many recipients"),
    ("data_reply", "554 5.2.2 STOREDRV.Submission.Exception:SubmissionQuotaExceededException", "data",
     "sending quota is used up"),
    ("mail_reply", "550 5.1.8 Access denied, bad outbound sender", "mail from", "blocked this account"),
    ("mail_reply", "550 5.7.705 Access denied, tenant has exceeded threshold", "mail from", "blocked this tenant"),
    ("mail_reply", "550 5.7.708 Access denied, traffic not accepted from this IP", "mail from", "sending IP"),
    ("mail_reply", "550 5.7.750 Client blocked from sending from unregistered domain", "mail from",
     "unregistered domain"),
    ("data_reply", "550 5.7.512 Access denied, message must be RFC 5322 section 3.6.2 compliant", "data",
     "From header"),
    ("data_reply", "550 5.6.11 SMTPSEND.BareLinefeedsAreIllegal", "data", "bare line feeds"),
    ("rcpt_reply", "550 5.7.1 Unable to relay", "rcpt to", "refused to relay"),
    ("rcpt_reply", "550 5.1.1 User unknown", "rcpt to", "does not exist"),
    ("data_reply", "550 5.1.90 Your message can't be sent because you've reached your daily limit for message "
     "recipients", "data", "daily recipient limit"),
    ("rcpt_reply", "550 5.7.703 Your message can't be delivered because messages to x@example.com are blocked by "
     "your organization", "rcpt to", "block list"),
    ("mail_reply", "451 4.7.550 Access denied, please try again later (AS4630)", "mail from", "suspicious activity"),
    ("mail_reply", "550 5.7.501 Access denied, spam abuse detected", "mail from", "banned this sending account"),
    ("mail_reply", "550 5.7.606 Access denied, banned sending IP [203.0.113.9]", "mail from", "block list"),
]
# fmt: on


@pytest.mark.parametrize(("hook", "reply", "step", "words"), SMTP_CASES, ids=[c[1][:12] for c in SMTP_CASES])
async def test_each_smtp_refusal_is_explained(mg: Mailgate, hook: str, reply: str, step: str, words: str) -> None:
    kw: dict[str, Any] = {hook: reply} if hook == "auth_failure" else {hook: lambda *a: reply}
    config = ServerConfig(security="starttls-required", auth={"PLAIN"}, **kw)
    if hook == "auth_failure":
        config = ServerConfig(security="starttls-required", auth={"PLAIN"}, password="not what we send", **kw)
    async with serve(config) as server:
        failed = await _report(mg, server)
    assert failed["name"] == step and words in failed["cause"], failed
    assert failed["fix"]


def test_every_smtp_catalogue_entry_has_a_case() -> None:
    from mailgate.diagnostics.catalogue import SMTP, _ranged

    codes = {re.search(r"\d\.\d\.\d+", reply).group(0) for _, reply, _, _ in SMTP_CASES}  # type: ignore[union-attr]
    provoked = codes | {_ranged(c) for c in codes}
    assert set(SMTP) <= provoked, set(SMTP) - provoked


# ---- unsaved settings and stored secrets -------------------------------------------------------


async def test_unsaved_settings_reuse_the_stored_password_for_the_same_destination(mg: Mailgate) -> None:
    async with serve(STARTTLS_AUTH) as server:
        await mg.servers.set("acme", doc(server))
        unsaved = doc(server)
        unsaved["auth"] = {"method": "password", "username": "user@example.com"}  # the password left out
        unsaved["from_name"] = "Acme notifications"
        report = await mg.test_server("acme", TO, settings=unsaved)
    assert report.ok and steps(report)["resolve settings"]["details"]["settings"] == "unsaved"


async def test_a_stored_password_is_not_sent_to_a_changed_host(mg: Mailgate) -> None:
    async with serve(STARTTLS_AUTH) as server, serve(STARTTLS_AUTH) as attacker:
        await mg.servers.set("acme", doc(server))
        moved = doc(attacker)
        moved["auth"] = {"method": "password", "username": "user@example.com", "password": {"set": True}}
        with pytest.raises(SettingsError, match="give it again"):
            await mg.test_server("acme", TO, settings=moved)
        assert attacker.auth_attempts == [] and attacker.connection_count == 0
        moved["auth"]["password"] = PASSWORD  # given again: then it may go there
        assert (await mg.test_server("acme", TO, settings=moved)).ok


# ---- oauth2: the token step --------------------------------------------------------------------

TENANT_ID = "0b8e4a5c-1d2f-4e3a-9b7c-5d6e7f8a9b0c"
CLIENT = "11111111-2222-3333-4444-555555555555"
SECRET = "Qx~8Q~secret.value-that-is-long_enough"
MAILBOX = "noreply@contoso.example"


def oauth_doc(idp: FakeIdentityProvider, server: RecordingServer, secret: str = SECRET) -> dict[str, Any]:
    return {"from_address": MAILBOX, "smtp": {"host": server.host, "port": server.port, "security": "none"},
            "auth": {"method": "oauth2", "username": MAILBOX,
                     "token": {"grant": "client_credentials", "provider": "microsoft", "authority": idp.url,
                               "directory_id": TENANT_ID, "client_id": CLIENT, "client_secret": secret}},
            "connection": {"connect_timeout": 5, "protocol_timeout": 5}}  # fmt: skip


@pytest.fixture
def idp() -> Iterator[FakeIdentityProvider]:
    with FakeIdentityProvider() as fake:
        fake.add_tenant(TENANT_ID)
        fake.add_app(CLIENT, SECRET, roles=("SMTP.SendAsApp",))
        yield fake


def xoauth2(idp: FakeIdentityProvider, **kw: Any) -> ServerConfig:
    return ServerConfig(security="none", auth={"XOAUTH2"}, auth_require_tls=False, username=MAILBOX,
                        xoauth2_style="exchange", **{"token_check": idp.check, **kw})  # fmt: skip


async def test_the_token_step_shows_the_decoded_claims_never_the_token(mg: Mailgate, idp: FakeIdentityProvider) -> None:
    async with serve(xoauth2(idp)) as server:
        await mg.servers.set("acme", oauth_doc(idp, server))
        report = await mg.test_server("acme", TO)
    found = steps(report)
    assert report.ok, report.to_dict()
    token = found["token"]["details"]
    assert token["format"] == "JWT" and token["tenant"] == TENANT_ID and token["roles"] == ["SMTP.SendAsApp"]
    assert token["audience"] == "https://outlook.office365.com" and token["expires"]
    assert found["auth"]["details"]["used"] == "XOAUTH2"
    [issued] = idp.issued  # the access token itself appears nowhere in the report
    assert issued not in str(report.to_dict()) and SECRET not in str(report.to_dict())


async def test_an_app_only_token_refused_with_5_7_3_points_at_the_service_principal(
    mg: Mailgate, idp: FakeIdentityProvider
) -> None:
    async with serve(xoauth2(idp, token_check=lambda token: False)) as server:
        await mg.servers.set("acme", oauth_doc(idp, server))
        failed = (await mg.test_server("acme", TO)).failed
    assert failed is not None and failed.name == "auth" and failed.explanation is not None
    assert "service principal" in failed.explanation.cause and "New-ServicePrincipal" in failed.explanation.fix


async def test_a_secret_id_pasted_for_the_secret_fails_at_the_token_step(
    mg: Mailgate, idp: FakeIdentityProvider
) -> None:
    async with serve(xoauth2(idp)) as server:
        await mg.servers.set("acme", oauth_doc(idp, server, secret="8c3a3f7e-0d3b-4a1e-9f6e-2b8f1c9d7e6a"))
        report = await mg.test_server("acme", TO)
        assert server.auth_attempts == []
    failed = report.failed
    assert failed is not None and failed.name == "token" and failed.explanation is not None
    assert "AADSTS7000215" in failed.explanation.cause and "Value" in failed.explanation.fix


# ---- through the API and the CLI ---------------------------------------------------------------


async def test_the_api_runs_the_test_for_a_tenant_admin(mg: Mailgate) -> None:
    import httpx2

    from mailgate.api import create_app

    token, _ = await mg.api_tokens.create("tenant-admin", "acme")
    async with serve(STARTTLS_AUTH) as server:
        await mg.servers.set("acme", doc(server))
        transport = httpx2.ASGITransport(app=create_app(mg))
        async with httpx2.AsyncClient(transport=transport, base_url="http://mailgate.test",
                                      headers={"Authorization": f"Bearer {token}"}) as http:  # fmt: skip
            reply = await http.post("/v1/tenants/acme/server/test", json={"to": TO})
            assert reply.status_code == 200 and reply.json()["ok"] is True
            assert [m.rcpt_tos for m in server.messages] == [[TO]]
            unsaved = {**doc(server), "auth": {"method": "password", "username": "user@example.com",
                                               "password": "wrong"}}  # fmt: skip
            reply = await http.post("/v1/tenants/acme/server/test", json={"to": TO, "settings": unsaved})
            body = reply.json()
            assert reply.status_code == 200 and body["ok"] is False and body["failed_step"] == "auth"
            assert "wrong" not in reply.text
            reply = await http.post("/v1/tenants/acme/server/test", json={"to": "not an address"})
            assert reply.status_code == 422 and reply.json()["problems"][0]["field"] == "to"


def test_the_cli_prints_each_step_and_exits_1_on_a_failure(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    mailgate = str(Path(sys.executable).with_name("mailgate"))
    env = {**os.environ, "MAILGATE_SECRET_KEYS": TEST_KEY, "MAILGATE_DATABASE_URL": f"sqlite:///{tmp_path}/c.db"}
    with serve_in_thread(STARTTLS_AUTH) as server:
        path = tmp_path / "global.json"
        path.write_text(json.dumps(doc(server)))
        subprocess.run([mailgate, "servers", "set", "global", "--file", str(path)], env=env, check=True,
                       capture_output=True)  # fmt: skip
        ok = subprocess.run([mailgate, "test", "global", "--to", TO, "--dry-run"], env=env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert "every step passed" in ok.stdout and "ok       auth" in ok.stdout and "skipped  data" in ok.stdout
        wrong = {**doc(server), "auth": {"method": "password", "username": "user@example.com"}}
        path.write_text(json.dumps(wrong))
        failed = subprocess.run([mailgate, "test", "global", "--to", TO, "--file", str(path), "--secret-stdin",
                                 "auth.password"], env=env, input="wrong\n", capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        assert failed.returncode == 1 and "FAILED   auth" in failed.stdout and "fix:" in failed.stdout
        assert server.messages == []


# ---- Graph -------------------------------------------------------------------------------------

GRAPH_TENANT = "7f0c2b9e-0000-4000-8000-00000000c0de"
GRAPH_APP = "22222222-3333-4444-5555-666666666666"
GRAPH_SECRET = "Gr~aph.secret-value_0123456789"
GRAPH_MAILBOX = "notifications@contoso.example"


def graph_doc(idp: FakeIdentityProvider, graph: FakeGraph, **settings: Any) -> dict[str, Any]:
    return {"kind": "graph", "from_address": GRAPH_MAILBOX,
            "graph": {"authority": idp.url, "endpoint": graph.url, "directory_id": GRAPH_TENANT,
                      "client_id": GRAPH_APP, "client_secret": GRAPH_SECRET, "mailbox": GRAPH_MAILBOX, **settings},
            "connection": {"connect_timeout": 5, "protocol_timeout": 10}}  # fmt: skip


@pytest.mark.parametrize("dry_run", [False, True])
async def test_graph_steps(mg: Mailgate, dry_run: bool) -> None:
    with FakeIdentityProvider() as idp:
        idp.add_tenant(GRAPH_TENANT)
        idp.add_app(GRAPH_APP, GRAPH_SECRET, roles=("Mail.Send",))
        with FakeGraph(idp) as graph:
            graph.add_mailbox(GRAPH_MAILBOX)
            await mg.servers.set("acme", graph_doc(idp, graph))
            report = await mg.test_server("acme", TO, dry_run=dry_run)
            sent = [r for r in graph.requests if r.path.endswith("/sendMail")]
    found = steps(report)
    assert report.ok and list(found) == ["resolve settings", "token", "permissions", "sendMail"]
    assert found["token"]["details"]["roles"] == ["Mail.Send"] and found["token"]["details"]["tenant"] == GRAPH_TENANT
    assert found["permissions"]["details"]["granted"] == ["Mail.Send"]
    assert (found["sendMail"]["status"], len(sent)) == (("skipped", 0) if dry_run else ("ok", 1))


async def test_graph_without_mail_read_write_for_large_attachments(mg: Mailgate) -> None:
    with FakeIdentityProvider() as idp:
        idp.add_tenant(GRAPH_TENANT)
        idp.add_app(GRAPH_APP, GRAPH_SECRET, roles=("Mail.Send",))
        with FakeGraph(idp) as graph:
            graph.add_mailbox(GRAPH_MAILBOX)
            await mg.servers.set("acme", graph_doc(idp, graph, large_attachments=True))
            report = await mg.test_server("acme", TO)
            assert not [r for r in graph.requests if r.path.endswith("/sendMail")]
    failed = report.failed
    assert failed is not None and failed.name == "permissions" and failed.explanation is not None
    assert "Mail.ReadWrite" in failed.explanation.cause and "Grant admin consent" in failed.explanation.fix


# ---- more failures of the session itself -------------------------------------------------------


async def test_a_server_that_never_greets_times_out_at_the_greeting(mg: Mailgate) -> None:
    async with scripted("silent") as server:
        await mg.servers.set("acme", {"from_address": "no-reply@acme.example",
                                      "smtp": {"host": server.host, "port": server.port, "security": "none"},
                                      "connection": {"connect_timeout": 2, "protocol_timeout": 0.5}})  # fmt: skip
        failed = (await mg.test_server("acme", TO)).failed
    assert failed is not None and failed.name == "greeting" and failed.explanation is not None
    assert "stopped answering" in failed.explanation.cause and failed.explanation.transient


async def test_a_server_offering_only_old_tls_is_refused(mg: Mailgate, tmp_path: Path) -> None:
    import ssl

    ca = certs.make_ca("mailgate old-tls CA")
    context = ca.issue().server_context()
    with pytest.warns(DeprecationWarning):  # so it is: that is the point
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    config = ServerConfig(security="starttls-required", auth={"PLAIN"}, ssl_context=context,
                          ca_file=ca.write(tmp_path))  # fmt: skip
    async with serve(config) as server:
        failed = await _report(mg, server)
    assert failed["name"] == "tls"
    assert "TLS 1.2 or" in failed["cause"] and "TLS 1.2 or 1.3" in failed["fix"], failed


async def test_no_mechanism_in_common_is_explained(mg: Mailgate) -> None:
    async with serve(ServerConfig(security="starttls-required", auth={"XOAUTH2"})) as server:
        failed = await _report(mg, server)  # a password, and the server wants XOAUTH2 only
    assert failed["name"] == "auth" and "no authentication mechanism" in failed["cause"]
    assert "oauth2" in failed["fix"]


async def test_gmail_refusing_the_access_token_is_explained(mg: Mailgate, idp: FakeIdentityProvider) -> None:
    config = ServerConfig(security="none", auth={"XOAUTH2"}, auth_require_tls=False, username=MAILBOX,
                          xoauth2_style="gmail", token_check=lambda token: False)  # fmt: skip
    async with serve(config) as server:
        await mg.servers.set("acme", oauth_doc(idp, server))
        failed = (await mg.test_server("acme", TO)).failed
    assert failed is not None and failed.name == "auth" and failed.explanation is not None
    assert "refused the access token" in failed.explanation.cause


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("250 2.0.0 Ok: queued as 4F3kQj1xyz", "4F3kQj1xyz"),  # Postfix
        ("250 OK id=1rAbCd-000123-4X", "1rAbCd-000123-4X"),  # Exim
        ("250 2.0.0 9a8b7c6d Message accepted for delivery", "9a8b7c6d"),  # OpenSMTPD
        ("250 2.0.0 3BKAbcde012345 Message accepted for delivery", "3BKAbcde012345"),  # Sendmail
        ("250 2.6.0 <a1@ex.example> [InternalId=4123, Hostname=AM0PR01MB] Queued mail for delivery", "4123"),
        ("250 2.0.0 OK  1701234567 a640c23a62f3a-a9f12  - gsmtp", "a640c23a62f3a-a9f12"),  # Gmail
        ("250 OK", None),
        ("250 Message accepted for delivery", None),
        ("250 2.0.0 Ok", None),
    ],
)
def test_the_queue_id_is_read_where_each_mta_puts_it(reply: str, expected: str | None) -> None:
    from mailgate.diagnostics.testmail import queue_id

    assert queue_id(reply) == expected
