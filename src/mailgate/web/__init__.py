"""The admin web UI under /admin: server-rendered Jinja2 pages with htmx (vendored in static/),
over the same service layer and the same access rules as the API."""

from .pages import install

__all__ = ["install"]
