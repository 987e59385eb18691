"""Opening the database: URLs, engines, sessions, and bringing the schema up to date.

SQLite (one file, WAL) is the default, in the working directory; PostgreSQL serves more than one
machine. Both go through SQLAlchemy's asyncio engine: aiosqlite for SQLite, psycopg 3 for
PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Connection, event, inspect, make_url, text
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from ..errors import SettingsError

log = logging.getLogger("mailgate.db")

DEFAULT_URL = "sqlite:///mailgate.db"
ENV_URL = "MAILGATE_DATABASE_URL"
# The newest migration in migrations/versions. A database at this revision is used as it is,
# without loading Alembic; tests/test_db.py keeps the two in step.
SCHEMA_REVISION = "0013"
MIGRATIONS = Path(__file__).with_name("migrations")
_MIGRATION_LOCK = 0x6D61696C67617465  # "mailgate": one schema upgrade at a time on PostgreSQL


def database_url(url: str | None = None) -> URL:
    """The async driver URL for `url`, $MAILGATE_DATABASE_URL, or the default SQLite file."""
    raw = url or os.environ.get(ENV_URL) or DEFAULT_URL
    try:
        parsed = make_url(raw)
    except ArgumentError:
        raise SettingsError([("database_url", f"{_redact(raw)!r} is not a database URL")]) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    raise SettingsError([("database_url", f"mailgate stores its data in sqlite or postgresql, not {backend}")])


def _redact(raw: str) -> str:
    # A URL may carry a password; never repeat it in an error.
    return raw.split("@", 1)[1] if "@" in raw else raw


def sqlite_path(url: URL) -> Path | None:
    """The database file of a SQLite URL (None for PostgreSQL and in-memory SQLite)."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).resolve()


@dataclass(frozen=True)
class Database:
    url: URL
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    # SQLite has one writer at a time. Writers of this process queue here, in order, instead of
    # in SQLite's busy handler, which sleeps 1…100 ms between tries and lets newcomers overtake.
    _writing: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False, compare=False)

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    @property
    def sqlite_path(self) -> Path | None:
        return sqlite_path(self.url)

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A session in a transaction that will write: committed at the end, rolled back on error.

        On SQLite it begins IMMEDIATE, taking the write lock first: a transaction that reads, then
        writes after another writer committed, fails at once in WAL mode ("database is locked",
        no busy wait). Reads use plain `sessions()`, which never block.
        """
        if not self.is_sqlite:
            async with self.sessions.begin() as session:
                yield session
            return
        async with self._writing, self.sessions.begin() as session:
            await session.connection(execution_options={_BEGIN: "IMMEDIATE"})
            yield session

    async def dispose(self) -> None:
        await self.engine.dispose()


MIN_SQLITE = (3, 35)  # UPDATE … RETURNING (claims), UPDATE … FROM and json_each (the outbox's writes)


def connect(url: URL) -> Database:
    if url.get_backend_name() == "sqlite":
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            needed = ".".join(map(str, MIN_SQLITE))
            why = f"mailgate needs SQLite {needed} or newer; this Python has {sqlite3.sqlite_version}"
            raise SettingsError([("database_url", f"{why} (use PostgreSQL, or a Python built with a newer SQLite)")])
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _private_file(path)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
    else:
        engine = create_async_engine(url, pool_pre_ping=True)
    return Database(url, engine, async_sessionmaker(engine, expire_on_commit=False))


def _private_file(database: Path) -> None:
    """Make a new database file 0600 before SQLite opens it: it holds message bodies and encrypted
    secrets, and SQLite gives its -wal and -shm files the database file's mode. An existing file
    with a looser mode is the operator's to change (a backup user may read it on purpose): a
    warning says so, as for the key file."""
    # It exists (another process may just have made it), or can't be made: then SQLite says why.
    with contextlib.suppress(OSError):
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for path in (database, *(database.with_name(database.name + end) for end in ("-wal", "-shm"))):
        with contextlib.suppress(OSError):
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                log.warning("the database file %s can be read by other users (mode %04o); run: chmod 600 %s",
                            path, mode, path)  # fmt: skip


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy, not the sqlite3 module, says when a transaction begins (see _sqlite_begin):
    # the module's own implicit BEGIN is always DEFERRED and comes only before DML.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    # WAL: readers don't block the writer. Switching needs a lock that SQLite does not wait for
    # (no busy handler): while another process creates a fresh database, try again briefly.
    for attempt in range(100):
        try:
            cursor.execute("PRAGMA journal_mode")
            if str(cursor.fetchone()[0]).lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError:
            if attempt == 99:
                raise
            time.sleep(0.05)
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes; WAL keeps it safe
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


_BEGIN = "mailgate_sqlite_begin"


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get(_BEGIN, '')}".strip())


async def current_revision(db: Database) -> str | None:
    async with db.engine.connect() as conn:
        return await conn.run_sync(_current_revision)


def _current_revision(conn: Connection) -> str | None:
    if not inspect(conn).has_table("alembic_version"):
        return None
    value = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return str(value) if value is not None else None


async def ensure_schema(db: Database) -> bool:
    """Create or upgrade the schema unless it is current. True when a migration ran."""
    if await current_revision(db) == SCHEMA_REVISION:
        return False
    await upgrade(db)
    return True


async def upgrade(db: Database, revision: str = "head") -> None:
    """Run Alembic migrations up to `revision`, one at a time.

    Alembic's migration context is global to the process, so runs in one process take turns
    (a lock per event loop); across processes a lock file beside the SQLite database, or an
    advisory lock on PostgreSQL, does the same. Alembic reads the revision again inside the
    lock, so whoever comes second finds nothing left to do.
    """
    from alembic import command
    from alembic.config import Config
    from alembic.util.exc import CommandError

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))

    def run(conn: Connection) -> None:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)

    loop = asyncio.get_running_loop()
    lock = _loop_locks.setdefault(loop, asyncio.Lock())
    async with lock, _file_lock(db.sqlite_path), db.engine.connect() as conn:
        if db.is_sqlite:
            await conn.execution_options(**{_BEGIN: "IMMEDIATE"})
        async with conn.begin():
            if not db.is_sqlite:
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            try:
                await conn.run_sync(run)
            except CommandError as e:
                raise SettingsError(
                    [("database", f"cannot migrate the database ({e}); is it from a newer mailgate?")]
                ) from None


_loop_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def _file_lock(database: Path | None) -> AsyncIterator[None]:
    if database is None:
        yield
        return
    fd = os.open(database.with_name(database.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
