"""The admin UI's notification template editor in process (ASGI), on its HTML: who may open and
change which scope's templates, CSRF on every form, the service's problems next to their field, the
preview in a sandboxed frame under a strict policy, reset, the audited changes on the audit page,
and the test message with its bound. The browser test is test_web_templates_browser.py."""

# ruff: noqa: F811 - the fixtures (ui) are imported from the module beside, and named as parameters
from __future__ import annotations

import re

import pytest

from mailgate.web.templates_pages import MAX_TEMPLATE_TESTS_PER_SCOPE
from test_web import ACME, ADMIN, GLOBEX, UI, smtp_doc, text_of, ui  # noqa: F401 - ui is a fixture

NL = "/admin/templates/acme/invitation/nl"
SUBJECT = "{{ inviter_name }} nodigt je uit voor {{ organization }}"


def form_of(page: str) -> dict[str, str]:
    """The editor form's subject, text and HTML as the page shows them."""
    import html

    subject = re.search(r'<input id="t-subject" name="subject" value="([^"]*)"', page)
    parts = {
        p: re.search(rf'<textarea id="t-{p}" name="{p}"[^>]*>(.*?)</textarea>', page, re.S) for p in ("text", "html")
    }
    assert subject and all(parts.values())
    return {"subject": html.unescape(subject.group(1))} | {p: html.unescape(m.group(1)) for p, m in parts.items() if m}


# ---- who may -------------------------------------------------------------------------------------


async def test_a_tenant_admin_edits_only_their_own_tenants_templates(ui: UI) -> None:
    acme = await ui.signed_in(ACME)
    assert (await acme.get("/admin/templates")).headers["location"] == "/admin/templates/acme"
    assert (await acme.get("/admin/templates/acme")).status_code == 200
    assert (await acme.get(NL)).status_code == 200
    # Another tenant's templates are exactly like no tenant's; the global defaults are a system admin's.
    for url in ("/admin/templates/globex", "/admin/templates/globex/invitation/nl"):
        assert (await acme.get(url)).status_code == 404, url
    for url in ("/admin/templates/global", "/admin/templates/global/invitation/nl"):
        assert (await acme.get(url)).status_code == 403, url
    form = {"subject": "Hijacked", "text": "Hijacked", "html": "", "to": ACME}
    for scope, status in (("globex", 404), ("global", 403)):
        for action in ("", "/preview", "/test", "/reset"):
            url = f"/admin/templates/{scope}/invitation/nl{action}"
            assert (await acme.post(url, form)).status_code == status, url
    assert (await ui.mg.templates.get("invitation", "nl", "globex")).source == "built-in"
    assert (await ui.mg.templates.get("invitation", "nl")).source == "built-in"
    assert not any(r.action.startswith("template.") for r in await ui.mg.audit_log(limit=100))


async def test_a_system_admin_edits_the_global_defaults_and_any_tenants(ui: UI) -> None:
    admin = await ui.signed_in(ADMIN)
    assert (await admin.get("/admin/templates")).headers["location"] == "/admin/templates/global"
    assert (await admin.get("/admin/templates", params={"tenant": "globex"})).headers["location"] == (
        "/admin/templates/globex"
    )
    listing = await admin.get("/admin/templates/global")
    assert listing.status_code == 200
    assert 'href="/admin/templates/global/invitation/de"' in listing.text
    await admin.get("/admin/templates/global/invitation/de")
    reply = await admin.post("/admin/templates/global/invitation/de", {"subject": "Einladung zu {{ organization }}",
                             "text": "Hallo {{ inviter_name }}", "html": ""})  # fmt: skip
    assert reply.status_code == 303
    assert (await ui.mg.templates.get("invitation", "de", "globex")).subject == "Einladung zu {{ organization }}"
    assert (await admin.get("/admin/templates/globex/invitation/de")).status_code == 200


# ---- CSRF ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["", "/preview", "/test", "/reset"])
async def test_a_template_form_without_the_csrf_token_changes_nothing(ui: UI, action: str) -> None:
    await ui.mg.servers.set("global", smtp_doc(2525))
    await ui.mg.templates.save("invitation", "nl", "acme", subject="Eigen", text="Eigen tekst", html="")
    before = await ui.mg.audit_log(limit=1000)
    acme = await ui.signed_in(ACME)
    await acme.get(NL)
    for token in (None, "forged-token"):
        data = {"subject": "Changed", "text": "Changed", "html": "", "to": ACME}
        if token is not None:
            data["csrf_token"] = token
        reply = await acme.post(NL + action, data, csrf=False)
        assert reply.status_code == 403, (action, token)
        assert "did not come from this page" in text_of(reply)
    assert await ui.mg.audit_log(limit=1000) == before
    assert (await ui.mg.templates.get("invitation", "nl", "acme")).subject == "Eigen"
    assert await ui.mg.queue.list_messages(tenant_id="acme") == []


# ---- the list ------------------------------------------------------------------------------------


async def test_the_list_shows_each_kind_its_variables_and_where_each_locale_comes_from(ui: UI) -> None:
    await ui.mg.templates.save("invitation", "de", None, subject="Global {{ organization }}", text="x", html="")
    await ui.mg.templates.save("invitation", "nl", "acme", subject="Eigen {{ organization }}", text="x", html="")
    acme = await ui.signed_in(ACME)
    page = await acme.get("/admin/templates/acme")
    section = re.search(r'<section class="template" aria-labelledby="k-invitation">(.*?)</section>', page.text, re.S)
    assert section is not None
    rows = {loc: " ".join(re.sub(r"<[^>]+>", " ", row).split())
            for loc, row in re.findall(r'<tr data-locale="([^"]+)">(.*?)</tr>', section.group(1), re.S)}  # fmt: skip
    assert list(rows) == ["en", "de", "fr", "nl"]
    assert "built-in" in rows["en"] and "global default, changed" in rows["de"] and "this tenant's own" in rows["nl"]
    for variable in ("inviter_name", "organization", "accept_url", "expires_at", "recipient_name"):
        assert f"<code>{variable}</code>" in section.group(1)
    # The navigation and the tenant's page lead here.
    assert 'href="/admin/templates/acme">Templates</a>' in page.text
    assert 'href="/admin/templates/acme">Notification templates</a>' in (await acme.get("/admin/tenants/acme")).text


async def test_another_locale_opens_its_editor_showing_the_fallback(ui: UI) -> None:
    acme = await ui.signed_in(ACME)
    reply = await acme.get("/admin/templates/acme/invitation", params={"locale": "nl_be"})
    assert reply.headers["location"] == "/admin/templates/acme/invitation/nl-BE"
    page = await acme.get(reply.headers["location"])
    assert "Now the built-in text in nl (there is none in nl-BE yet)" in text_of(page)
    assert (await acme.get("/admin/templates/acme/invitation", params={"locale": "not a tag"})).status_code == 404
    assert (await acme.get("/admin/templates/acme/no_such_kind/nl")).status_code == 404


# ---- saving --------------------------------------------------------------------------------------


async def test_saving_stores_the_override_and_the_audit_page_shows_it(ui: UI) -> None:
    acme = await ui.signed_in(ACME)
    form = form_of((await acme.get(NL)).text)
    assert form["subject"] == (await ui.mg.templates.get("invitation", "nl")).subject
    reply = await acme.post(NL, form | {"subject": SUBJECT, "text": form["text"].replace("\n", "\r\n")})
    assert reply.status_code == 303 and reply.headers["location"] == NL
    saved = await ui.mg.templates.get("invitation", "nl", "acme")
    assert (saved.source, saved.subject, saved.updated_by) == ("tenant", SUBJECT, f"user:{ACME} (tenant-admin of acme)")
    assert "\r" not in saved.text  # the browser's CRLF line ends are not kept
    page = await acme.get(NL)
    assert "Saved: this tenant now sends this nl text." in text_of(page)
    assert "This tenant's own text, saved" in text_of(page) and 'href="' + NL + '/reset"' in page.text
    audit = text_of(await acme.get("/admin/audit"))
    assert f"user:{ACME} (tenant-admin of acme) template.set acme" in audit
    assert f"invitation.nl.subject : — → {SUBJECT}" in audit and "invitation.nl.html" in audit


async def test_an_undeclared_variable_is_shown_next_to_its_field_and_nothing_is_saved(ui: UI) -> None:
    acme = await ui.signed_in(ACME)
    form = form_of((await acme.get(NL)).text)
    reply = await acme.post(NL, form | {"subject": "Hallo {{ password }}"})
    assert reply.status_code == 422
    subject_field = re.search(r'<div class="field invalid">\s*<label for="t-subject">.*?</div>', reply.text, re.S)
    assert subject_field is not None, reply.text
    assert "uses password, which this template does not declare" in text_of_html(subject_field.group(0))
    assert 'aria-describedby="t-subject-help t-subject-error"' in subject_field.group(0)
    assert form_of(reply.text)["subject"] == "Hallo {{ password }}"  # what was typed stays
    assert "Not saved: see the fields marked below." in text_of(reply)
    assert (await ui.mg.templates.get("invitation", "nl", "acme")).source == "built-in"
    assert not any(r.action == "template.set" for r in await ui.mg.audit_log(limit=100))


def text_of_html(fragment: str) -> str:
    import html

    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


async def test_reset_asks_first_and_then_sends_the_default_again(ui: UI) -> None:
    await ui.mg.templates.save("invitation", "nl", "acme", subject="Eigen", text="Eigen tekst", html="")
    acme = await ui.signed_in(ACME)
    confirm = await acme.get(NL + "/reset")
    assert confirm.status_code == 200 and "Are you sure?" in text_of(confirm)
    assert (await ui.mg.templates.get("invitation", "nl", "acme")).source == "tenant"  # asking changes nothing
    reply = await acme.post(NL + "/reset")
    assert reply.status_code == 303
    assert (await ui.mg.templates.get("invitation", "nl", "acme")).source == "built-in"
    assert "is the built-in text (nl) again" in text_of(await acme.get(NL))
    assert "template.reset" in text_of(await acme.get("/admin/audit"))
    assert (await acme.get(NL + "/reset")).status_code == 404  # nothing of its own left to reset


# ---- the preview ---------------------------------------------------------------------------------


async def test_the_preview_renders_the_unsaved_text_in_a_sandboxed_frame_under_a_strict_policy(ui: UI) -> None:
    acme = await ui.signed_in(ACME)
    page = await acme.get(NL)
    policy = page.headers.get_list("content-security-policy")
    assert len(policy) == 1
    directives = {d.split()[0]: d.split()[1:] for d in policy[0].split(";") if d.strip()}
    assert directives["default-src"] == ["'none'"] and directives["script-src"] == ["'self'"]
    assert directives["frame-ancestors"] == ["'none'"] and directives["base-uri"] == ["'none'"]
    assert "frame-src" not in directives and "child-src" not in directives  # default-src 'none': no frame loads
    assert re.search(r"<script(?![^>]*\ssrc=)[^>]*>", page.text) is None
    form = form_of(page.text) | {
        "subject": SUBJECT,
        "html": "<p>Hoi <b>{{ inviter_name }}</b></p><script>alert(1)</script>",
    }
    reply = await acme.post(NL + "/preview", form, headers={"HX-Request": "true"})
    assert reply.status_code == 200
    frame = re.search(r"<iframe ([^>]*)>", reply.text)
    assert frame is not None
    attributes = frame.group(1)
    assert re.search(r"(^|\s)sandbox(\s|$)", attributes) and "allow-" not in attributes
    assert (
        'srcdoc="&lt;p&gt;Hoi &lt;b&gt;Ada Lovelace&lt;/b&gt;&lt;/p&gt;&lt;script&gt;alert(1)&lt;/script&gt;"'
        in attributes
    )
    assert "<script>" not in reply.text
    assert "Ada Lovelace nodigt je uit voor Acme Corp" in text_of(reply)  # the subject, with the samples
    assert (await ui.mg.templates.get("invitation", "nl", "acme")).source == "built-in"  # not saved
    # Without htmx the whole editor comes back, with the typed text and its preview.
    whole = await acme.post(NL + "/preview", form)
    assert whole.status_code == 200 and form_of(whole.text)["subject"] == SUBJECT
    assert "Ada Lovelace nodigt je uit voor Acme Corp" in text_of(whole)
    assert "default-src 'none'" in whole.headers["content-security-policy"]


async def test_the_preview_says_what_is_wrong_with_the_typed_text(ui: UI) -> None:
    acme = await ui.signed_in(ACME)
    form = form_of((await acme.get(NL)).text) | {"text": "{% for x in range(10) %}{{ x }}{% endfor %}"}
    reply = await acme.post(NL + "/preview", form, headers={"HX-Request": "true"})
    assert reply.status_code == 422 and "<iframe" not in reply.text
    assert "Can't be shown as typed" in text_of(reply) and "text:" in text_of(reply)


# ---- a test of the template ----------------------------------------------------------------------


async def test_a_test_of_the_saved_template_goes_through_the_outbox_and_links_to_the_message(ui: UI) -> None:
    await ui.mg.servers.set("global", smtp_doc(2525))
    await ui.mg.templates.save("invitation", "nl", "acme", subject=SUBJECT, text="Hoi {{ inviter_name }}", html="")
    acme = await ui.signed_in(ACME)
    page = await acme.get(NL)
    assert f'name="to" type="email" value="{ACME}"' in page.text  # the admin's own address by default
    reply = await acme.post(NL + "/test", {"to": "check@acme.example"}, headers={"HX-Request": "true"})
    assert reply.status_code == 200
    [message] = await ui.mg.queue.list_messages(tenant_id="acme")
    assert message.subject == "Ada Lovelace nodigt je uit voor Acme Corp"
    assert f'<a href="/admin/messages/{message.id}">message {message.id}</a>' in reply.text
    detail = await ui.mg.queue.get(message.id)
    assert [r["recipient"] for r in detail.to_dict()["recipient_outcomes"]] == ["check@acme.example"]


async def test_tests_of_one_scopes_templates_are_bounded_per_minute(ui: UI) -> None:
    await ui.mg.servers.set("global", smtp_doc(2525))
    acme, globex = await ui.signed_in(ACME), await ui.signed_in(GLOBEX)
    await acme.get(NL)
    await globex.get("/admin/templates/globex/invitation/nl")
    replies = [
        await acme.post(NL + "/test", {"to": "check@acme.example"}) for _ in range(MAX_TEMPLATE_TESTS_PER_SCOPE + 1)
    ]
    assert [r.status_code for r in replies] == [200] * MAX_TEMPLATE_TESTS_PER_SCOPE + [429]
    assert "Not sent:" in text_of(replies[-1]) and "in the last minute" in text_of(replies[-1])
    assert len(await ui.mg.queue.list_messages(tenant_id="acme")) == MAX_TEMPLATE_TESTS_PER_SCOPE
    # Another tenant's tests are its own.
    assert (
        await globex.post("/admin/templates/globex/invitation/nl/test", {"to": "g@globex.example"})
    ).status_code == 200


async def test_a_global_defaults_test_goes_through_the_tenant_picked_with_the_global_text(ui: UI) -> None:
    await ui.mg.servers.set("global", smtp_doc(2525))
    await ui.mg.templates.save("invitation", "fr", "globex", subject="Globex only", text="x", html="")
    await ui.mg.templates.save("invitation", "fr", None, subject="Global {{ organization }}", text="x", html="")
    admin = await ui.signed_in(ADMIN)
    await admin.get("/admin/templates/global/invitation/fr")
    reply = await admin.post("/admin/templates/global/invitation/fr/test", {"to": "x@example.com", "tenant": "globex"},
                             headers={"HX-Request": "true"})  # fmt: skip
    assert reply.status_code == 200, reply.text
    [message] = await ui.mg.queue.list_messages(tenant_id="globex")
    assert message.subject == "Global Acme Corp"
    bad = await admin.post("/admin/templates/global/invitation/fr/test", {"to": "not an address", "tenant": "globex"},
                           headers={"HX-Request": "true"})  # fmt: skip
    assert bad.status_code == 422 and "Not sent:" in text_of(bad)
