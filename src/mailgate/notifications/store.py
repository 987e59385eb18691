"""`mg.templates`: the notification templates as each scope sees them — built-in, overridden for
every tenant ("global"), or overridden for one tenant — and their rendering.

A template is looked up per locale first, then per scope: for a tenant and "nl-BE" the tenant's
nl-BE, the global nl-BE, the built-in nl-BE, then the same for "nl", then for "en". An override is
whole (subject, text and HTML together), so a mail never mixes two authors' parts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select

from ..db.engine import Database
from ..db.models import TemplateOverride, now
from ..errors import NotFound
from ..settings.store import GLOBAL, _audit, _tenant
from . import engine
from .engine import TemplateError
from .kinds import LOCALES, Kind, fallbacks, kinds, normalize_locale

LOOKUP_TTL = 1.0  # seconds another process's template change may take to reach submits here
_Rows = list[TemplateOverride]  # (`Templates.list` hides the builtin inside the class)


@dataclass(frozen=True)
class LocaleState:
    """One locale of a template, as a scope sees it."""

    locale: str
    built_in: bool  # mailgate ships this locale
    global_override: bool  # the system admin changed it for every tenant
    tenant_override: bool  # this tenant changed it (False when listing for the global scope)

    def to_dict(self) -> dict[str, Any]:
        return {
            "locale": self.locale,
            "built_in": self.built_in,
            "global_override": self.global_override,
            "tenant_override": self.tenant_override,
        }


@dataclass(frozen=True)
class TemplateInfo:
    name: str
    title: str
    description: str
    variables: tuple[Any, ...]  # kinds.Variable: name, type, required, description, sample
    locales: tuple[LocaleState, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "variables": [v.to_dict() for v in self.variables],
            "locales": [loc.to_dict() for loc in self.locales],
        }


@dataclass(frozen=True)
class TemplateText:
    """A template's text as a scope uses it for a locale (`locale`: the one found, maybe a fallback)."""

    name: str
    locale: str
    subject: str
    text: str
    html: str
    source: str  # "built-in", "global" or "tenant"
    updated_at: datetime | None = None
    updated_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "locale": self.locale,
            "subject": self.subject,
            "text": self.text,
            "html": self.html,
            "source": self.source,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
            "updated_by": self.updated_by,
        }


@dataclass(frozen=True)
class Rendered:
    name: str
    locale: str  # the locale used (after fallback)
    source: str  # "built-in", "global" or "tenant"
    subject: str
    text: str
    html: str | None  # None when the template's HTML is empty: a text-only message

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "locale": self.locale,
            "source": self.source,
            "subject": self.subject,
            "text": self.text,
            "html": self.html,
        }


class Templates:
    """`mg.templates`. `tenant` None is the global scope (the defaults every tenant starts from);
    a tenant's id, that tenant's own. Who may change which scope is the caller's check
    (`access.Principal.must_manage_settings(scope)`, as for mail servers)."""

    def __init__(self, db: Database, actor: str, on_change: Callable[[], None] | None = None) -> None:
        self.db = db
        self.actor = actor
        self._on_change = on_change
        self._cached: dict[tuple[str, str], tuple[float, _Rows]] = {}

    def acting_as(self, actor: str) -> Templates:
        view = Templates(self.db, actor, self._on_change)
        view._cached = self._cached  # one cache per process: a change here clears it for every view
        return view

    def forget_cached(self) -> None:
        self._cached.clear()

    async def list(self, tenant: str | None = None) -> list[TemplateInfo]:
        """Every kind, with its variables and, per locale, whether it is overridden."""
        scopes = [GLOBAL] if tenant is None else [GLOBAL, tenant]
        async with self.db.sessions() as s:
            if tenant is not None:
                await _tenant(s, tenant)
            rows = (await s.execute(
                select(TemplateOverride.scope, TemplateOverride.name, TemplateOverride.locale)
                .where(TemplateOverride.scope.in_(scopes))
            )).all()  # fmt: skip
        overridden = {(r.scope, r.name, r.locale) for r in rows}
        out = []
        for kind in kinds().values():
            extra = sorted({loc for _, name, loc in overridden if name == kind.name} - set(LOCALES))
            out.append(TemplateInfo(kind.name, kind.title, kind.description, kind.variables, tuple(
                LocaleState(loc, loc in LOCALES, (GLOBAL, kind.name, loc) in overridden,
                            tenant is not None and (tenant, kind.name, loc) in overridden)
                for loc in [*LOCALES, *extra]
            )))  # fmt: skip
        return out

    def sample_data(self, name: str) -> dict[str, Any]:
        """The sample values of `name`'s variables (what a preview or a test of it fills in)."""
        return _kind(name).sample_data

    async def get(self, name: str, locale: str | None = None, tenant: str | None = None) -> TemplateText:
        """The text `tenant` (None: the global scope) uses for `name` in `locale` (after fallback)."""
        kind = _kind(name)
        rows = await self._overrides(kind.name, tenant, cached=False)
        return _pick(kind, rows, locale, tenant)

    async def save(
        self, name: str, locale: str, tenant: str | None = None, *, subject: str, text: str, html: str
    ) -> TemplateText:
        """Override `name` in `locale` for the scope (whole: subject, text, and HTML — empty for a
        text-only message). TemplateError lists every problem by part. Audited."""
        kind = _kind(name)
        tag = _locale(locale)
        problems = await asyncio.to_thread(_problems, kind, subject, text, html)
        if isinstance(text, str) and not text.strip():
            problems.append(("text", "may not be empty: every message has a text part"))
        if problems:
            raise TemplateError(problems)
        scope = tenant or GLOBAL
        async with self.db.write() as s:
            if tenant is not None:
                await _tenant(s, tenant, lock=True)
            row = await s.scalar(_one(scope, kind.name, tag).with_for_update())
            before = _pick(kind, [row] if row else [], tag, tenant) if row else None
            if row is None:
                row = TemplateOverride(scope=scope, tenant_id=tenant, name=kind.name, locale=tag, subject=subject,
                                       text=text, html=html, updated_by=self.actor)  # fmt: skip
                s.add(row)
            else:
                row.subject, row.text, row.html = subject, text, html
                row.updated_at, row.updated_by = now(), self.actor
            await s.flush()
            changes = [
                {"field": f"{kind.name}.{tag}.{part}", "from": _digest(getattr(before, part)) if before else None,
                 "to": _digest(value)}
                for part, value in (("subject", subject), ("text", text), ("html", html))
                if before is None or getattr(before, part) != value
            ]  # fmt: skip
            if changes:
                _audit(s, self.actor, "template.set", tenant, scope, changes)
            saved = _text(kind.name, row, tenant)
        self._changed()
        return saved

    async def reset(self, name: str, locale: str, tenant: str | None = None) -> TemplateText:
        """Remove the scope's override of `name` in `locale` (NotFound if there is none); returns
        what the scope uses now. Audited."""
        kind = _kind(name)
        tag = _locale(locale)
        scope = tenant or GLOBAL
        async with self.db.write() as s:
            if tenant is not None:
                await _tenant(s, tenant, lock=True)
            row = await s.scalar(_one(scope, kind.name, tag).with_for_update())
            if row is None:
                raise NotFound([("template", f"{kind.name} in {tag} is not overridden for {scope}")])
            await s.execute(delete(TemplateOverride).where(TemplateOverride.id == row.id))
            _audit(s, self.actor, "template.reset", tenant, scope,
                   [{"field": f"{kind.name}.{tag}", "from": "override", "to": None}])  # fmt: skip
        self._changed()
        return await self.get(kind.name, tag, tenant)

    async def preview(
        self,
        name: str,
        locale: str | None = None,
        tenant: str | None = None,
        *,
        subject: str | None = None,
        text: str | None = None,
        html: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Rendered:
        """Render for a look, not to send: unsaved `subject`/`text`/`html` replace the saved parts,
        and `data` None means the kind's sample values."""
        kind = _kind(name)
        saved = _pick(kind, await self._overrides(kind.name, tenant, cached=False), locale, tenant)
        if subject is not None or text is not None or html is not None:
            saved = TemplateText(kind.name, _locale(locale) if locale else saved.locale,
                                 saved.subject if subject is None else subject, saved.text if text is None else text,
                                 saved.html if html is None else html, "unsaved")  # fmt: skip
        return _render(kind, saved, kind.sample_data if data is None else data)

    async def render(
        self, name: str, locale: str | None, tenant: str | None, data: Mapping[str, Any] | None
    ) -> Rendered:
        """The parts of a message: TemplateError names each missing, unknown or bad variable as
        data.<name>, and nothing is half-rendered. An unknown template is a TemplateError too
        (field "template"): here it is part of a message's input, not a resource looked up."""
        _known(name)
        kind = _kind(name)
        return _render(kind, _pick(kind, await self._overrides(kind.name, tenant), locale, tenant), data)

    async def _overrides(self, name: str, tenant: str | None, *, cached: bool = True) -> _Rows:
        # Submits look the overrides up once a second per (tenant, template); changes made here
        # clear that at once. Reads for admins always go to the database.
        key = (tenant or GLOBAL, name)
        at = time.monotonic()
        hit = self._cached.get(key) if cached else None
        if hit is not None and at - hit[0] < LOOKUP_TTL:
            return hit[1]
        scopes = [GLOBAL] if tenant is None else [GLOBAL, tenant]
        async with self.db.sessions() as s:
            if tenant is not None and not cached:
                await _tenant(s, tenant)
            query = select(TemplateOverride).where(TemplateOverride.scope.in_(scopes), TemplateOverride.name == name)
            rows = list((await s.scalars(query)).all())
            for row in rows:
                s.expunge(row)
        if len(self._cached) > 10_000:
            self._cached.clear()
        self._cached[key] = (at, rows)
        return rows

    def _changed(self) -> None:
        self._cached.clear()
        if self._on_change is not None:
            self._on_change()


def render_built_in(name: str, locale: str | None, data: Mapping[str, Any] | None) -> Rendered:
    """A built-in template rendered without a database (`mailgate send --server FILE --template`):
    no override can apply. TemplateError as for `Templates.render`."""
    _known(name)
    kind = kinds()[name]
    return _render(kind, _pick(kind, [], locale, None), data)


def _problems(kind: Kind, subject: str, text: str, html: str) -> list[tuple[str, str]]:
    # In a thread: parsing 64 KB of template takes a good part of a second, the event loop's
    # other requests and deliveries should not wait for it.
    declared = {v.name: v for v in kind.variables}
    problems = engine.check("subject", subject, declared, limit=engine.MAX_SUBJECT_SOURCE)
    if isinstance(subject, str) and ("\n" in subject or "\r" in subject):
        problems.append(("subject", "is one line"))
    return problems + engine.check("text", text, declared) + engine.check("html", html, declared)


def _known(name: str) -> None:
    if not isinstance(name, str) or name not in kinds():
        raise TemplateError([("template", f"there is no template {str(name)[:64]!r}; there are {', '.join(kinds())}")])


def _kind(name: str) -> Kind:
    kind = kinds().get(name) if isinstance(name, str) else None
    if kind is None:
        raise NotFound([("template", f"there is no template {str(name)[:64]!r}; there are {', '.join(kinds())}")])
    return kind


def _locale(locale: str) -> str:
    tag = normalize_locale(locale)
    if tag is None:
        raise TemplateError([("locale", f"{str(locale)[:32]!r} is not a language tag such as en, nl or nl-BE")])
    return tag


def _one(scope: str, name: str, locale: str) -> Any:
    return select(TemplateOverride).where(
        TemplateOverride.scope == scope, TemplateOverride.name == name, TemplateOverride.locale == locale
    )


def _pick(kind: Kind, rows: list[TemplateOverride], locale: str | None, tenant: str | None) -> TemplateText:
    if locale is not None:
        _locale(locale)
    by = {(r.scope, r.locale): r for r in rows}
    for tag in fallbacks(locale):
        if tenant is not None and (row := by.get((tenant, tag))) is not None:
            return _text(kind.name, row, tenant)
        if (row := by.get((GLOBAL, tag))) is not None:
            return _text(kind.name, row, None)
        if (built := kind.texts.get(tag)) is not None:
            return TemplateText(kind.name, tag, built.subject, built.text, built.html, "built-in")
    raise AssertionError("every kind is built in English")  # fallbacks() always ends with "en"


def _text(name: str, row: TemplateOverride, tenant: str | None) -> TemplateText:
    source = "global" if row.scope == GLOBAL else "tenant"
    return TemplateText(name, row.locale, row.subject, row.text, row.html, source, row.updated_at, row.updated_by)


def _render(kind: Kind, template: TemplateText, data: Mapping[str, Any] | None) -> Rendered:
    declared = {v.name: v for v in kind.variables}
    values = engine.checked_data(
        declared, data, types={v.name: v.type for v in kind.variables},
        required={v.name for v in kind.variables if v.required},
    )  # fmt: skip
    parts = {}
    for part in ("subject", "text", "html"):
        source = getattr(template, part)
        parts[part] = engine.compiled(kind.name, part, source, declared).render(values) if source.strip() else ""
    subject = " ".join(parts["subject"].split())  # one line, whatever the values held
    return Rendered(kind.name, template.locale, template.source, subject, parts["text"], parts["html"] or None)


def _digest(value: str) -> str:
    """How the audit log shows a changed part: its length and start (templates can be long)."""
    return value if len(value) <= 80 else f"{value[:77]}… ({len(value):,} characters)"
