"""Alembic environment: migrates the job database with the service's own engine settings.

The URL comes from the caller's config (``service.db.alembic_config``) when given, otherwise
from ``MASKD_DATABASE_URL``; the engine comes from ``service.db.make_engine`` so SQLite
migrations run with the same pragmas and locking as the service.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from service.config import get_settings
from service.db import make_engine
from service.models import Base

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = Base.metadata


def database_url() -> str:
    return config.get_main_option("sqlalchemy.url") or get_settings().database_url


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(database_url())
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection, target_metadata=target_metadata, render_as_batch=True
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
