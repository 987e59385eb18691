"""The built-in notification kinds: their variables and their texts in each built-in locale, read
once from the TOML files in builtin/ (package data). A kind's HTML there is the body only; it is
placed in builtin/layout.html here, so what an admin sees and overrides is one whole document."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

LOCALES: tuple[str, ...] = ("en", "de", "fr", "nl")  # every built-in kind is written in each
FALLBACK_LOCALE = "en"
VARIABLE_TYPES = ("string", "number", "boolean", "list")
_LOCALE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8}){0,2}")


@dataclass(frozen=True)
class Variable:
    """A value a template may use. `sample` fills the preview; a required one must be given at
    submit, an optional one left out is None (printed as nothing)."""

    name: str
    type: str  # one of VARIABLE_TYPES; "list" is a list of strings
    required: bool
    description: str
    sample: Any

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "required": self.required,
            "description": self.description,
            "sample": self.sample,
        }


@dataclass(frozen=True)
class Text:
    subject: str
    text: str
    html: str


@dataclass(frozen=True)
class Kind:
    name: str
    title: str
    description: str
    variables: tuple[Variable, ...]
    texts: dict[str, Text]  # by locale: every one of LOCALES

    @property
    def sample_data(self) -> dict[str, Any]:
        return {v.name: v.sample for v in self.variables}

    def variable(self, name: str) -> Variable | None:
        return next((v for v in self.variables if v.name == name), None)


def normalize_locale(value: str) -> str | None:
    """ "nl_be" → "nl-BE"; None for what is not a language tag (at most 16 characters)."""
    if not isinstance(value, str) or len(value) > 16 or not _LOCALE.fullmatch(value):
        return None
    parts = value.replace("_", "-").split("-")
    rest = [p.upper() if len(p) == 2 else p.lower() for p in parts[1:]]
    return "-".join([parts[0].lower(), *rest])


def fallbacks(locale: str | None) -> list[str]:
    """The locales to try, best first: the exact one (nl-BE), its language (nl), then English."""
    chain: list[str] = []
    tag = normalize_locale(locale) if locale else None
    if tag is not None:
        parts = tag.split("-")
        chain += ["-".join(parts[:i]) for i in range(len(parts), 0, -1)]
    if FALLBACK_LOCALE not in chain:
        chain.append(FALLBACK_LOCALE)
    return chain


@cache
def kinds() -> dict[str, Kind]:
    """Every built-in kind by name, read from the package's files once."""
    folder = resources.files(__package__) / "builtin"
    layout = (folder / "layout.html").read_text("utf-8")
    found: dict[str, Kind] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".toml"):
            continue
        name = entry.name.removesuffix(".toml")
        doc = tomllib.loads(entry.read_text("utf-8"))
        variables = tuple(
            Variable(key, spec.get("type", "string"), bool(spec.get("required", True)), spec.get("description", ""),
                     spec["sample"])
            for key, spec in doc["variables"].items()
        )  # fmt: skip
        texts = {
            locale: Text(
                doc[locale]["subject"].strip(),
                doc[locale]["text"].lstrip("\n"),
                layout.replace("{lang}", locale).replace("<!-- body -->", doc[locale]["html"].strip()),
            )
            for locale in LOCALES
        }
        found[name] = Kind(name, doc["title"], doc["description"], variables, texts)
    return found


class _Kinds:
    """KINDS: the built-in kinds as a read-only mapping, read when first used."""

    def __getitem__(self, name: str) -> Kind:
        return kinds()[name]

    def __contains__(self, name: object) -> bool:
        return name in kinds()

    def __iter__(self) -> Any:
        return iter(kinds())

    def get(self, name: str) -> Kind | None:
        return kinds().get(name)


KINDS = _Kinds()
