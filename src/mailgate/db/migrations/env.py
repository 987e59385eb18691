"""Alembic environment: migrations run on the connection mailgate hands over (db/engine.py),
never from a URL in a config file."""

from alembic import context

from mailgate.db.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
