"""Notification templates in the service layer: the built-in kinds in every locale, locale
fallback, overrides per scope, the variables checked at submit, the sandbox and its bounds, and the
audit log — on SQLite and PostgreSQL (`mg` fixture)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import insert, select

from mailgate import Mailgate, NotFound
from mailgate.db.models import TemplateOverride
from mailgate.notifications import KINDS, LOCALES
from mailgate.notifications.engine import MAX_NODES, MAX_OUTPUT, MAX_SOURCE, TemplateError, check
from mailgate.notifications.kinds import fallbacks, normalize_locale
from mailgate.notifications.store import render_built_in

INVITATION = {"inviter_name": "Ada", "organization": "Acme Corp", "accept_url": "https://app.example/a?t=1",
              "expires_at": "1 May"}  # fmt: skip


def problems(e: pytest.ExceptionInfo[TemplateError]) -> dict[str, str]:
    return dict(e.value.problems)


# ---- the built-in kinds ------------------------------------------------------------------------


def test_the_kinds_the_issue_names_are_built_in() -> None:
    assert set(KINDS) == {"invitation", "password_reset", "login_details", "subscription_update", "import_failed",
                          "access_review"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(KINDS))
@pytest.mark.parametrize("locale", LOCALES)
def test_every_built_in_kind_renders_in_every_locale(name: str, locale: str) -> None:
    kind = KINDS[name]
    declared = {v.name: v for v in kind.variables}
    text = kind.texts[locale]
    # The built-ins pass the same check as a tenant's text.
    assert check("subject", text.subject, declared) + check("text", text.text, declared) + check(
        "html", text.html, declared) == []  # fmt: skip
    rendered = render_built_in(name, locale, kind.sample_data)
    assert rendered.locale == locale and rendered.subject and "\n" not in rendered.subject
    assert f'<html lang="{locale}">' in (rendered.html or "")
    assert 'name="viewport"' in (rendered.html or "") and "@media" in (rendered.html or "")
    for part in (rendered.subject, rendered.text, rendered.html or ""):
        assert "{{" not in part and "{%" not in part
    url = next(v.sample for v in kind.variables if v.name.endswith("_url"))
    assert url in rendered.text and f'href="{url}"' in (rendered.html or "")


def test_translations_differ_per_locale() -> None:
    subjects = {loc: render_built_in("password_reset", loc, KINDS["password_reset"].sample_data).subject
                for loc in LOCALES}  # fmt: skip
    assert len(set(subjects.values())) == 4
    assert "Passwort" in subjects["de"] and "mot de passe" in subjects["fr"] and "wachtwoord" in subjects["nl"]


def test_html_values_are_escaped_and_text_values_are_not() -> None:
    rendered = render_built_in("invitation", "en", {**INVITATION, "organization": "<b>R&D</b>"})
    assert "&lt;b&gt;R&amp;D&lt;/b&gt;" in (rendered.html or "") and "<b>R&D</b>" not in (rendered.html or "")
    assert "<b>R&D</b>" in rendered.text


def test_a_value_cannot_break_the_subject_into_two_header_lines() -> None:
    rendered = render_built_in("invitation", "en", {**INVITATION, "inviter_name": "Ada\r\nBcc: x@evil.example"})
    assert "\n" not in rendered.subject and "\r" not in rendered.subject


def test_optional_variables_left_out_print_nothing() -> None:
    rendered = render_built_in("import_failed", "en", {"import_name": "HR", "failed_at": "today",
                                                       "details_url": "https://x.example/r"})  # fmt: skip
    assert rendered.text.startswith("Hello,\n") and "None" not in rendered.text
    assert "What went wrong" not in rendered.text
    listed = render_built_in("import_failed", "en", {**KINDS["import_failed"].sample_data, "errors": ["bad line 3"]})
    assert "- bad line 3" in listed.text and "<li" in (listed.html or "")


# ---- locales -----------------------------------------------------------------------------------


def test_locale_falls_back_from_region_to_language_to_english() -> None:
    assert fallbacks("nl-BE") == ["nl-BE", "nl", "en"]
    assert fallbacks("de_at") == ["de-AT", "de", "en"] and fallbacks(None) == ["en"]
    assert normalize_locale("../etc") is None and normalize_locale("x" * 20) is None
    assert render_built_in("invitation", "nl-BE", INVITATION).locale == "nl"
    assert render_built_in("invitation", "pt-BR", INVITATION).locale == "en"
    with pytest.raises(TemplateError) as e:
        render_built_in("invitation", "not a locale!", INVITATION)
    assert "locale" in problems(e)


# ---- variables at submit -----------------------------------------------------------------------


def test_missing_and_unknown_variables_are_each_named() -> None:
    with pytest.raises(TemplateError) as e:
        render_built_in("invitation", "en", {"organization": "Acme", "colour": "red"})
    assert set(problems(e)) == {"data.inviter_name", "data.accept_url", "data.expires_at", "data.colour"}
    assert "is required" in problems(e)["data.accept_url"] and "recipient_name" in problems(e)["data.colour"]


@pytest.mark.parametrize(("value", "field"), [
    ("x" * 4_001, "data.organization"),
    ({"nested": "object"}, "data.organization"),
    (["a", "list"], "data.organization"),
])  # fmt: skip
def test_values_are_checked_and_bounded(value: Any, field: str) -> None:
    with pytest.raises(TemplateError) as e:
        render_built_in("invitation", "en", {**INVITATION, "organization": value})
    assert set(problems(e)) == {field}


def test_lists_are_of_strings_and_bounded() -> None:
    base = KINDS["import_failed"].sample_data
    for bad in (["x"] * 101, [["nested"]], "not a list", [{"a": 1}]):
        with pytest.raises(TemplateError) as e:
            render_built_in("import_failed", "en", {**base, "errors": bad})
        assert set(problems(e)) == {"data.errors"}
    with pytest.raises(TemplateError) as e:
        render_built_in("import_failed", "en", {**base, "errors": ["y" * 4_000] * 17})  # 68,000 characters
    assert "data" in problems(e)


def test_a_number_variable_takes_numbers_only() -> None:
    base = KINDS["access_review"].sample_data
    assert "1 access waits" in render_built_in("access_review", "en", {**base, "item_count": 1}).text
    with pytest.raises(TemplateError) as e:
        render_built_in("access_review", "en", {**base, "item_count": "many"})
    assert set(problems(e)) == {"data.item_count"}


# ---- the sandbox -------------------------------------------------------------------------------

HOSTILE = [
    ("subject", "{{ ''.__class__.__mro__ }}"),
    ("text", "{{ organization.__class__.__init__.__globals__ }}"),
    ("text", "{{ organization.upper() }}"),
    ("text", "{{ range(10) }}"),
    ("text", "{{ lipsum() }}"),
    ("text", "{{ cycler }}"),
    ("text", "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}"),
    ("text", "{% for a in errors %}{% for b in errors %}x{% endfor %}{% endfor %}"),
    ("text", "{% for c in organization %}{% if c == 'x' %}{% endif %}{% endfor %}"),
    ("text", "{% for e in errors %}{{ errors|join(',') }}{% endfor %}"),
    ("text", "{% for e in errors %}" + "{{ e }}" * 60 + "{% endfor %}"),
    ("text", "{{ 'x' * 1000000000 }}"),
    ("text", "{{ 9 ** 999999 }}"),
    ("text", "{{ organization|center(1000000000) }}"),
    ("text", "{{ organization|replace('', organization) }}"),
    ("text", "{{ '%s' % organization }}"),
    ("text", "{{ organization|title }}"),
    ("text", "{{ organization|striptags }}"),
    ("text", "{{ organization|join('" + "y" * 60_000 + "') }}"),
    ("text", "{{ organization|join(organization) }}"),
    ("text", "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}"),
    ("text", "{% include 'layout.html' %}"),
    ("text", "{% set big = organization ~ organization %}{{ big }}"),
    ("html", "{% autoescape false %}{{ organization }}{% endautoescape %}"),
    ("html", "{{ organization|safe }}"),
    ("text", "{{ secret_key }}"),
    ("text", "{{ organization[idx] }}"),
    ("text", "{{ organization"),
]


@pytest.mark.parametrize(("field", "source"), HOSTILE, ids=[f"{f}:{s[:48]}" for f, s in HOSTILE])
def test_hostile_templates_are_refused_at_save(field: str, source: str) -> None:
    # import_failed: organization-like strings are import_name; errors is its list.
    source = source.replace("organization", "import_name")
    found = check(field, source, {v.name: v for v in KINDS["import_failed"].variables})
    assert found and found[0][0] == field, found


def test_a_loop_over_a_list_variable_is_allowed() -> None:
    declared = {v.name: v for v in KINDS["subscription_update"].variables}
    assert check("text", "{% for c in changes %}{{ loop.index }}. {{ c|upper }}{% endfor %}", declared) == []
    assert check("text", "{{ changes|join(', ') }}", declared) == []


async def test_a_hostile_template_stored_behind_the_service_s_back_does_not_run(mg: Mailgate) -> None:
    # The check runs again when a template is compiled: a row written into the database directly
    # (an old version, a restore) is refused at render, not run.
    async with mg.db.write() as s:
        await s.execute(insert(TemplateOverride).values(
            scope="global", tenant_id=None, name="invitation", locale="en", subject="{{ ''.__class__.__mro__ }}",
            text="t", html="", updated_by="someone",
        ))  # fmt: skip
    await mg.tenants.add("acme")
    with pytest.raises(TemplateError) as e:
        await mg.templates.render("invitation", "en", "acme", INVITATION)
    assert "subject" in problems(e)


def test_rendering_stops_at_the_output_bound() -> None:
    # Allowed constructs can still multiply: the values may hold 64 K characters, and a loop
    # body may print them many times over. Rendering stops at MAX_OUTPUT, whatever the template.
    kind = KINDS["import_failed"]
    body = "{{ errors|join }}" * 100
    assert check("text", body, {v.name: v for v in kind.variables}) == []
    from mailgate.notifications.engine import compiled

    data = {**kind.sample_data, "errors": ["y" * 4_000] * 16}
    from mailgate.notifications.engine import checked_data

    values = checked_data({v.name: v for v in kind.variables}, data, types={"errors": "list"},
                          required=set())  # fmt: skip
    started = time.perf_counter()
    with pytest.raises(TemplateError) as e:
        compiled(kind.name, "text", body, {v.name: v for v in kind.variables}).render(values)
    assert f"more than {MAX_OUTPUT:,}" in problems(e)["text"]
    assert time.perf_counter() - started < 2  # unbounded, it would build 6.4 M characters


def test_the_costliest_template_allowed_renders_in_milliseconds() -> None:
    # The most work per element allowed: every value (64 K characters) joined and transformed,
    # as often as MAX_NODES allows, and a loop's body as large as allowed over 100 items.
    kind = KINDS["import_failed"]
    declared = {v.name: v for v in kind.variables}
    outside = "{% if errors|join|capitalize|upper|lower == '' %}{% endif %}" * 50
    inside = "{% for e in errors %}" + "{% if e|capitalize|upper|lower == '' %}{% endif %}" * 7 + "{% endfor %}"
    from mailgate.notifications.engine import checked_data, compiled

    for body, items in ((outside, ["y y<b>&" * 500] * 16), (inside, ["y y<b>&" * 80] * 100)):
        assert check("text", body, declared) == [], body[:60]
        values = checked_data(declared, {**kind.sample_data, "errors": items}, types={"errors": "list"},
                              required=set())  # fmt: skip
        template = compiled(kind.name, "text", body, declared)
        started = time.perf_counter()
        template.render(values)
        assert time.perf_counter() - started < 0.25


def test_a_template_of_too_many_elements_is_refused() -> None:
    # Compiling grows with the elements: a 64 KB part of 9,000 `{{ e }}` took 1.5 s to compile.
    declared = {v.name: v for v in KINDS["invitation"].variables}
    assert check("text", "{{ organization }}" * (MAX_NODES - 10), declared) == []
    (problem,) = check("text", "{{ organization }}" * (MAX_NODES + 1), declared)
    assert "too elaborate" in problem[1]


# ---- overrides, scopes and the audit log -------------------------------------------------------


async def test_a_tenant_override_applies_to_that_tenant_only(mg: Mailgate) -> None:
    await mg.tenants.add("acme")
    await mg.tenants.add("globex")
    await mg.templates.save("invitation", "nl", "acme", subject="Acme: {{ organization }}",
                            text="Welkom bij Acme, {{ accept_url }}", html="")  # fmt: skip
    await mg.templates.save("invitation", "de", None, subject="Global: {{ organization }}",
                            text="Global {{ accept_url }}", html="<p>{{ organization }}</p>")  # fmt: skip
    acme_nl = await mg.templates.render("invitation", "nl-BE", "acme", INVITATION)
    assert (acme_nl.source, acme_nl.locale, acme_nl.subject, acme_nl.html) == ("tenant", "nl", "Acme: Acme Corp", None)
    globex_nl = await mg.templates.render("invitation", "nl", "globex", INVITATION)
    assert globex_nl.source == "built-in" and "nodigt je uit" in globex_nl.subject
    assert (await mg.templates.render("invitation", "de", "acme", INVITATION)).source == "global"
    assert (await mg.templates.render("invitation", "de", "globex", INVITATION)).html == "<p>Acme Corp</p>"
    listed = {t.name: t for t in await mg.templates.list("acme")}["invitation"]
    states = {s.locale: (s.global_override, s.tenant_override) for s in listed.locales}
    assert states == {"en": (False, False), "de": (True, False), "fr": (False, False), "nl": (False, True)}
    assert (await mg.templates.reset("invitation", "nl", "acme")).source == "built-in"
    with pytest.raises(NotFound):
        await mg.templates.reset("invitation", "nl", "acme")


async def test_a_variant_locale_can_be_added(mg: Mailgate) -> None:
    await mg.tenants.add("acme")
    await mg.templates.save("invitation", "nl_be", "acme", subject="Dag {{ organization }}", text="Dag", html="")
    assert (await mg.templates.render("invitation", "nl-BE", "acme", INVITATION)).subject == "Dag Acme Corp"
    assert (await mg.templates.render("invitation", "nl", "acme", INVITATION)).source == "built-in"
    listed = {t.name: t for t in await mg.templates.list("acme")}["invitation"]
    assert [s.locale for s in listed.locales] == ["en", "de", "fr", "nl", "nl-BE"]


async def test_save_lists_every_problem_by_part(mg: Mailgate) -> None:
    with pytest.raises(TemplateError) as e:
        await mg.templates.save("invitation", "en", None, subject="two\nlines", text=" ", html="{{ nope }}")
    assert set(problems(e)) == {"subject", "text", "html"} and "nope" in problems(e)["html"]
    with pytest.raises(TemplateError) as e:
        await mg.templates.save("invitation", "en", None, subject="s", text="x" * (MAX_SOURCE + 1), html="")
    assert "at most 65,536 characters" in problems(e)["text"]
    with pytest.raises(NotFound):
        await mg.templates.save("no_such", "en", None, subject="s", text="t", html="")
    with pytest.raises(NotFound):
        await mg.templates.save("invitation", "en", "no-tenant", subject="s", text="t", html="")
    async with mg.db.sessions() as s:
        assert (await s.scalars(select(TemplateOverride))).all() == []


async def test_every_change_is_audited(mg: Mailgate) -> None:
    await mg.tenants.add("acme")
    admin = mg.acting_as("token:7 (tenant-admin of acme)")
    await admin.templates.save("invitation", "fr", "acme", subject="Salut", text="Bonjour {{ accept_url }}", html="")
    await admin.templates.save("invitation", "fr", "acme", subject="Salut !", text="Bonjour {{ accept_url }}", html="")
    await admin.templates.reset("invitation", "fr", "acme")
    log = [e for e in await mg.audit_log("acme") if e.action.startswith("template.")]
    assert [e.action for e in log] == ["template.reset", "template.set", "template.set"]
    assert {e.actor for e in log} == {"token:7 (tenant-admin of acme)"} and {e.scope for e in log} == {"acme"}
    assert log[1].changes == [{"field": "invitation.fr.subject", "from": "Salut", "to": "Salut !"}]
    assert {c["field"] for c in log[2].changes} == {"invitation.fr.subject", "invitation.fr.text", "invitation.fr.html"}


async def test_a_removed_tenant_takes_its_overrides_along(mg: Mailgate) -> None:
    await mg.tenants.add("acme")
    await mg.templates.save("invitation", "en", "acme", subject="Acme", text="t", html="")
    await mg.tenants.remove("acme")
    async with mg.db.sessions() as s:
        assert (await s.scalars(select(TemplateOverride))).all() == []


async def test_preview_uses_samples_and_unsaved_text(mg: Mailgate) -> None:
    shown = await mg.templates.preview("invitation", "de")
    assert shown.subject == "Ada Lovelace hat Sie zu Acme Corp eingeladen"
    draft = await mg.templates.preview("invitation", "de", subject="Entwurf {{ organization }}", data=INVITATION)
    assert (draft.subject, draft.source) == ("Entwurf Acme Corp", "unsaved") and "beizutreten" in draft.text
    with pytest.raises(TemplateError):
        await mg.templates.preview("invitation", "de", html="{{ ''.__class__ }}")


async def test_submit_template_stores_the_rendered_message(mg: Mailgate) -> None:
    await mg.tenants.add("acme")
    await mg.servers.set("global", {"kind": "smtp", "enabled": True, "from_address": "no-reply@example.com",
                                    "smtp": {"host": "127.0.0.1", "port": 2525, "security": "none"}})  # fmt: skip
    pk = await mg.submit_template("acme", "invitation", INVITATION, to=["bob@example.org"], locale="fr")
    stored = await mg.queue.get(pk)
    assert stored.summary.subject == "Ada vous invite à rejoindre Acme Corp"
    with pytest.raises(TemplateError) as e:
        await mg.submit_template("acme", "invitation", {"organization": "Acme"}, to=["bob@example.org"])
    assert "data.accept_url" in problems(e)
    with pytest.raises(TemplateError) as e:
        await mg.submit_template("acme", "no_such", {}, to=["bob@example.org"])
    assert "template" in problems(e)
    assert len(await mg.queue.list_messages(tenant_id="acme")) == 1
