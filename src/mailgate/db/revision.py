"""Write the next migration from the models: `python -m mailgate.db.revision "what changed"`.

For developers. Autogenerates against a scratch SQLite database upgraded to the current head;
read and correct the result before committing it (see migrations/README.md).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile

from sqlalchemy import Connection

from .engine import MIGRATIONS, connect, database_url, upgrade


async def write_revision(message: str) -> None:
    from alembic import command
    from alembic.config import Config

    number = len(list((MIGRATIONS / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))) + 1
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    with tempfile.TemporaryDirectory() as scratch:
        db = connect(database_url(f"sqlite:///{scratch}/scratch.db"))
        try:
            await upgrade(db)

            def run(conn: Connection) -> None:
                config.attributes["connection"] = conn
                command.revision(config, message, autogenerate=True, rev_id=f"{number:04d}")

            async with db.engine.begin() as conn:
                await conn.run_sync(run)
        finally:
            await db.dispose()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit('usage: python -m mailgate.db.revision "what changed"')
    asyncio.run(write_revision(sys.argv[1]))
