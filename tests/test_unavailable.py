"""A database that can't be used just now — a full disk, a server that went away — answers 503
`unavailable` with Retry-After, in mailgate's words (never the driver's text, which may quote SQL
or a URL), and /readyz says which check failed and why. Real bugs stay 500."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy import event, make_url, text

from conftest import TEST_KEY
from mailgate import Mailgate
from mailgate.api import create_app
from mailgate.api.errors import UNAVAILABLE_RETRY_AFTER, unavailable

GLOBAL = {"kind": "smtp", "from_address": "no-reply@example.com",
          "smtp": {"host": "127.0.0.1", "port": 2525, "security": "none"}}  # fmt: skip
MESSAGE = {"to": ["bob@example.org"], "subject": "Invitation", "text": "x" * 200_000}  # needs new pages


@contextlib.asynccontextmanager
async def client(mg: Mailgate) -> AsyncIterator[tuple[httpx2.AsyncClient, dict[str, str], dict[str, str]]]:
    await mg.tenants.add("acme")
    await mg.servers.set("global", GLOBAL)
    admin, _ = await mg.api_tokens.create("system-admin", name="ops")
    sender, _ = await mg.api_tokens.create("sender", "acme")
    transport = httpx2.ASGITransport(app=create_app(mg))
    async with httpx2.AsyncClient(transport=transport, base_url="http://mailgate.test") as http:
        yield http, {"Authorization": f"Bearer {admin}"}, {"Authorization": f"Bearer {sender}"}


def assert_unavailable(reply: httpx2.Response, *leaks: str) -> None:
    assert reply.status_code == 503, reply.text
    assert reply.json()["code"] == "unavailable" and reply.headers["retry-after"] == str(UNAVAILABLE_RETRY_AFTER)
    for leak in ("INSERT", "SELECT", "sqlite", "psycopg", *leaks):
        assert leak not in reply.text


async def test_a_full_disk_answers_503_and_readyz_says_the_disk_is_full(tmp_path: Path) -> None:
    async with Mailgate.open(f"sqlite:///{tmp_path}/m.db", secret_keys=TEST_KEY) as mg, client(mg) as (http, _, sender):
        async with mg.db.sessions() as s:
            pages = int((await s.execute(text("PRAGMA page_count"))).scalar_one())

        # The database file may not grow by a page: SQLite answers SQLITE_FULL, as on a full disk.
        def full(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA max_page_count = {pages}")
            cursor.close()

        event.listen(mg.db.engine.sync_engine, "connect", full)
        await mg.db.engine.dispose()  # new connections, each with the limit
        reply = await http.post("/v1/messages", json=MESSAGE, headers=sender)
        assert_unavailable(reply, "full")
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == "failed: the disk is full (OperationalError, in a recent request)"

        event.remove(mg.db.engine.sync_engine, "connect", full)
        await mg.db.engine.dispose()  # room again: the same submit is stored
        assert (await http.post("/v1/messages", json=MESSAGE, headers=sender)).status_code == 202


class Proxy:
    """A TCP proxy on 127.0.0.1 to a database server, which can go away like the server would."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def go_away(self) -> None:
        """Stop listening (new connections are refused) and drop every connection."""
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.transport.abort()
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), 5)
        self._server = None


async def test_a_database_server_that_went_away_answers_503_and_readyz_says_it_cannot_connect(
    postgres_schema_url: str,
) -> None:
    url = make_url(postgres_schema_url)
    proxy = Proxy((url.host or "127.0.0.1", url.port or 5432))
    await proxy.start()
    try:
        through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        async with Mailgate.open(through, secret_keys=TEST_KEY) as mg, client(mg) as (http, admin, sender):
            assert (await http.post("/v1/messages", json=MESSAGE, headers=sender)).status_code == 202
            await proxy.go_away()
            assert_unavailable(await http.post("/v1/messages", json=MESSAGE, headers=sender), str(proxy.port))
            assert_unavailable(await http.get("/v1/messages", headers=admin), str(proxy.port))
            assert_unavailable(await http.get("/v1/tenants", headers=admin), str(proxy.port))
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and str(proxy.port) not in ready.text
            assert (
                ready.json()["checks"]["database"] == "failed: cannot connect (connection refused) (OperationalError)"
            )
    finally:
        await proxy.go_away()


# ---- which errors say "unavailable": real ones, raised by the drivers --------------------------------


def test_sqlite_full_disk_io_and_locks_are_unavailability_and_sql_errors_are_bugs(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT UNIQUE)")
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(sqlite3.OperationalError) as full:
        db.execute("INSERT INTO t (v) VALUES (?)", ("x" * 100_000,))
    assert unavailable(full.value) == "the disk is full"
    with pytest.raises(sqlite3.OperationalError) as missing:
        db.execute("SELECT * FROM no_such_table")
    assert unavailable(missing.value) is None
    db.execute("INSERT INTO t (v) VALUES ('a')")
    with pytest.raises(sqlite3.IntegrityError) as twice:
        db.execute("INSERT INTO t (v) VALUES ('a')")
    assert unavailable(twice.value) is None

    other = sqlite3.connect(tmp_path / "x.db", isolation_level=None, timeout=0)
    db.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError) as locked:
        other.execute("BEGIN IMMEDIATE")
    assert unavailable(locked.value) == "the database is locked by another writer"
    db.close()
    other.close()

    with pytest.raises(sqlite3.OperationalError) as cannot_open:
        sqlite3.connect(f"file:{tmp_path}/no/such/dir/x.db?mode=rw", uri=True)
    assert unavailable(cannot_open.value) == "the database file cannot be opened"


def test_a_refused_connection_and_a_full_disk_are_unavailability() -> None:
    import psycopg

    with socket_closed() as port, pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(f"postgresql://user:pa55word@127.0.0.1:{port}/db", connect_timeout=5)
    assert unavailable(refused.value) == "cannot connect (connection refused)"
    if Path("/dev/full").exists():  # Linux: every write to it fails with ENOSPC
        fd = os.open("/dev/full", os.O_WRONLY)
        try:
            with pytest.raises(OSError) as no_space:
                os.write(fd, b"x")
        finally:
            os.close(fd)
        assert no_space.value.errno == errno.ENOSPC and unavailable(no_space.value) == "the disk is full"
    assert unavailable(ValueError("a bug")) is None


@contextlib.contextmanager
def socket_closed() -> Any:
    """A port on 127.0.0.1 that nothing listens on (taken, then let go)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port
