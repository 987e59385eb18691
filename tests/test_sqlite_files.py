"""The SQLite database's files hold message bodies and encrypted secrets: a new database and its
-wal and -shm files are readable by their owner only, whatever the umask; an existing database
that others can read is left as the operator made it, with a warning."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TEST_KEY
from mailgate import Mailgate


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_new_database_and_its_wal_and_shm_are_private(tmp_path: Path, permissive_umask: None) -> None:
    database = tmp_path / "mailgate.db"
    async with Mailgate.open(f"sqlite:///{database}", secret_keys=TEST_KEY) as mg:
        await mg.tenants.add("acme")  # a write: the -wal and -shm files exist while the database is open
        files = [database, tmp_path / "mailgate.db-wal", tmp_path / "mailgate.db-shm", tmp_path / "mailgate.db.lock"]
        assert {f.name: oct(mode(f)) for f in files} == {f.name: "0o600" for f in files}


async def test_an_existing_database_others_can_read_is_left_alone_with_a_warning(
    tmp_path: Path, permissive_umask: None, caplog: pytest.LogCaptureFixture
) -> None:
    database = tmp_path / "mailgate.db"
    async with Mailgate.open(f"sqlite:///{database}", secret_keys=TEST_KEY):
        pass
    database.chmod(0o640)
    with caplog.at_level(logging.WARNING, logger="mailgate"):
        async with Mailgate.open(f"sqlite:///{database}", secret_keys=TEST_KEY) as mg:
            await mg.tenants.add("acme")
    assert mode(database) == 0o640
    warned = [r.getMessage() for r in caplog.records if "can be read by other users" in r.getMessage()]
    assert warned == [f"the database file {database} can be read by other users (mode 0640); run: chmod 600 {database}"]
