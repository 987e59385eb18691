"""The database layer: URLs, migrations that match the models, concurrent first use."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import Connection

from conftest import TEST_KEY
from mailgate import Mailgate, SettingsError
from mailgate.db.engine import MIGRATIONS, SCHEMA_REVISION, connect, current_revision, upgrade
from mailgate.db.engine import database_url as parse_url
from mailgate.db.models import Base


def test_schema_revision_is_the_newest_migration() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(config).get_heads() == [SCHEMA_REVISION]


async def test_migrations_create_exactly_the_models(database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    db = connect(parse_url(database_url))
    try:
        await upgrade(db)

        def diff(conn: Connection) -> list[Any]:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)

        async with db.engine.connect() as conn:
            assert await conn.run_sync(diff) == []
    finally:
        await db.dispose()


@pytest.mark.parametrize(
    ("given", "driver"),
    [
        ("sqlite:///x.db", "sqlite+aiosqlite"),
        ("sqlite+pysqlite:///x.db", "sqlite+aiosqlite"),
        ("postgresql://u@h/db", "postgresql+psycopg"),
        ("postgres://u@h/db", "postgresql+psycopg"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg"),
    ],
)
def test_database_urls_get_the_async_driver(given: str, driver: str) -> None:
    assert parse_url(given).drivername == driver


def test_other_databases_are_refused_without_repeating_a_password() -> None:
    with pytest.raises(SettingsError, match="sqlite or postgresql, not mysql") as e:
        parse_url("mysql://root:hunter2@localhost/db")
    assert "hunter2" not in str(e.value)
    with pytest.raises(SettingsError, match="not a database URL") as e:
        parse_url("::not a url:hunter2@x")
    assert "hunter2" not in str(e.value)


def test_the_default_is_sqlite_in_the_working_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILGATE_DATABASE_URL", raising=False)
    url = parse_url(None)
    assert (url.drivername, url.database) == ("sqlite+aiosqlite", "mailgate.db")
    monkeypatch.setenv("MAILGATE_DATABASE_URL", "postgresql://u@h/db")
    assert parse_url(None).drivername == "postgresql+psycopg"


async def test_two_processes_creating_a_fresh_database_at_once_both_succeed(database_url: str) -> None:
    async def open_and_add(tenant: str) -> None:
        async with Mailgate.open(database_url, secret_keys=TEST_KEY) as mg:
            await mg.tenants.add(tenant)

    await asyncio.gather(open_and_add("a"), open_and_add("b"))
    async with Mailgate.open(database_url, secret_keys=TEST_KEY) as mg:
        assert [t.id for t in await mg.tenants.list()] == ["a", "b"]
        assert await current_revision(mg.db) == SCHEMA_REVISION


async def test_concurrent_writers_never_see_database_is_locked(database_url: str) -> None:
    # On SQLite a transaction that reads, then writes after another writer committed, fails at
    # once unless it began IMMEDIATE; several service instances at once provoke exactly that.
    async with Mailgate.open(database_url, secret_keys=TEST_KEY):
        pass  # create the schema first: this test is about writers, not migrations

    async def writer(i: int) -> None:
        async with Mailgate.open(database_url, secret_keys=TEST_KEY) as mg:
            await mg.tenants.add(f"t{i}")
            await mg.tenants.update(f"t{i}", may_use_own_server=True)

    await asyncio.gather(*(writer(i) for i in range(8)))
    async with Mailgate.open(database_url, secret_keys=TEST_KEY) as mg:
        assert len(await mg.tenants.list()) == 8


def test_a_sqlite_too_old_for_the_outbox_is_refused_with_the_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.34.1")
    with pytest.raises(SettingsError) as refused:
        connect(parse_url("sqlite:///mailgate.db"))
    assert refused.value.problems == [("database_url", "mailgate needs SQLite 3.35 or newer; this Python has 3.34.1 "
                                       "(use PostgreSQL, or a Python built with a newer SQLite)")]  # fmt: skip
