"""Alembic environment: runs on the connection handed in by app.store.db.Database.upgrade,
or on ``sqlalchemy.url`` when Alembic is called directly (``alembic -c alembic.ini upgrade head``)."""

from alembic import context
from sqlalchemy import create_engine

from app.store.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection, schema):
    opts = {}
    if schema and connection.dialect.name == "postgresql":
        opts["version_table_schema"] = schema
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True, **opts)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    schema = config.attributes.get("schema")
    if connection is not None:
        _run(connection, schema)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as conn:
        _run(conn, schema)


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
