"""Fixtures shared by the storage tests: every test that takes `database_url` runs twice, on a
fresh SQLite file and on a fresh PostgreSQL schema (when $MAILGATE_TEST_POSTGRES_URL names a
server; `.ci/run` sets it, and the run says so when it is missing)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from cryptography.fernet import Fernet

from mailgate import Mailgate

POSTGRES_URL = os.environ.get("MAILGATE_TEST_POSTGRES_URL", "")
# The fake mail servers and identity providers listen on 127.0.0.1, tenants' servers among them:
# the suite lets tenants reach loopback (tests/test_hostile.py checks the default, which doesn't).
# A test that builds its own Config says tenant_networks="loopback" where it needs it.
os.environ.setdefault("MAILGATE_TENANT_NETWORKS", "loopback")
SKIP_POSTGRES = "PostgreSQL variant skipped: set MAILGATE_TEST_POSTGRES_URL (.ci/run does) to run it"
TEST_KEY = Fernet.generate_key().decode()


def pytest_report_header() -> str:
    if POSTGRES_URL:
        return f"PostgreSQL tests: on, {POSTGRES_URL.split('@')[-1]}"
    return "PostgreSQL tests: SKIPPED (MAILGATE_TEST_POSTGRES_URL is not set; .ci/run sets it)"


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture
def postgres_schema_url() -> Iterator[str]:
    """A URL whose connections use a new, empty schema of their own; dropped afterwards."""
    if not POSTGRES_URL:
        pytest.skip(SKIP_POSTGRES)
    import psycopg

    schema = f"mailgate_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(POSTGRES_URL), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(_libpq(POSTGRES_URL), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db')}/mailgate.db"
    url: str = request.getfixturevalue("postgres_schema_url")
    return url


@pytest.fixture
async def mg(database_url: str) -> AsyncIterator[Mailgate]:
    async with Mailgate.open(database_url, secret_keys=TEST_KEY, actor="tester") as opened:
        yield opened
