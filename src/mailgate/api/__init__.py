"""The HTTP API (FastAPI): `create_app` in app.py; routers in messages.py and settings.py;
health and metrics in health.py; error replies in errors.py."""

from .app import create_app

__all__ = ["create_app"]
