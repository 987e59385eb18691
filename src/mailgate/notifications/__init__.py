"""Notification templates: the built-in kinds (invitation, password reset, …) in several languages,
overridden globally or per tenant, rendered in a Jinja2 sandbox into a message's subject, text and
HTML. `mg.templates` (store.py) is the service; `mg.submit_template` sends one."""

from .kinds import KINDS, LOCALES, Kind, Variable
from .store import LocaleState, Rendered, TemplateInfo, Templates, TemplateText

__all__ = [
    "KINDS",
    "LOCALES",
    "Kind",
    "LocaleState",
    "Rendered",
    "TemplateInfo",
    "TemplateText",
    "Templates",
    "Variable",
]
