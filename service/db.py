"""Engines, sessions and schema migrations for the job database.

SQLite (embedded) and PostgreSQL (production) behave differently under concurrent writers, so
the differences are settled here once: SQLite runs in WAL mode with a busy timeout and takes its
write lock when a transaction begins (``BEGIN IMMEDIATE``), which makes the store's
read-then-update transactions serialisable instead of failing with "database is locked" halfway
through. The schema belongs to alembic; processes refuse to start on an outdated schema rather
than fail later on a missing column.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

MIGRATIONS_PACKAGE = "maskd_migrations"
"""``migrations/`` at the repository root, shipped in the wheel under this name."""
SQLITE_BUSY_TIMEOUT_MS = 30_000
AUTOCOMMIT_POOL_SIZE = 20
"""Connections the API's autocommit engine keeps open. A pool smaller than the number of
threads using it would open a connection for each request past it and close it on return (a
new server process per request on PostgreSQL); with ``max_overflow=0`` the threads past it
wait for a pooled connection instead. FastAPI runs at most 40 handler threads; 20 keeps two API
processes and the workers well within PostgreSQL's default 100 connections."""


class SchemaOutdatedError(RuntimeError):
    """The database's schema revision is not the one this code was written for."""


def make_engine(url: str, *, pooled: bool = True) -> Engine:
    """An engine configured for the backend named by ``url``.

    For a SQLite file the parent folder is created, so the embedded default
    (``sqlite:///var/maskd.db``) works in a fresh checkout. ``pooled=False`` closes each
    connection after use: for a process that forks, whose children must not inherit open ones.
    """
    parsed = make_url(url)
    pool: dict[str, Any] = {} if pooled else {"poolclass": NullPool}
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=pooled, **pool)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False}, **pool)
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_immediate)
    return engine


def make_autocommit_engine(url: str) -> Engine:
    """An engine for the API's hot work that is one statement each: reads (a key, a job, a
    page of jobs) and the dispatch stamp.

    One statement is atomic and sees one consistent snapshot on its own, so these connections
    run in autocommit: no ``BEGIN``/``COMMIT`` round trips, and on SQLite no write lock taken
    for a read (the transactional engine takes it at ``BEGIN IMMEDIATE``; a read must not
    queue behind writers). There is no pre-ping either, which would cost one more round trip
    per statement: ``StoreBase._autocommit`` retries once on a fresh connection when the
    database dropped the pooled one (a restart).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(
            url, isolation_level="AUTOCOMMIT", pool_size=AUTOCOMMIT_POOL_SIZE, max_overflow=0
        )
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False})
    # With the driver's transaction handling off and no "begin" listener, every statement
    # commits on its own.
    event.listen(engine, "connect", _configure_sqlite_connection)
    return engine


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    # The driver's own transaction handling is turned off so that "begin" below decides how
    # a transaction starts.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _begin_immediate(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (the store copies them out)."""
    return sessionmaker(engine, expire_on_commit=False)


def migrations_dir() -> Path:
    """The installed Alembic scripts (a plain folder: the package is never zipped)."""
    return Path(str(files(MIGRATIONS_PACKAGE)))


def alembic_config(url: str) -> Config:
    """An alembic configuration for ``url`` that does not depend on the working directory."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@lru_cache(maxsize=1)
def head_revision() -> str:
    """The revision the code expects: the head of the installed migration scripts (read once:
    they do not change while a process runs)."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    if head is None:
        raise RuntimeError(f"no migration scripts found under {migrations_dir() / 'versions'}")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision recorded in the database, or None for an empty (never migrated) one."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def check_schema_current(engine: Engine) -> None:
    """Raise ``SchemaOutdatedError`` with the fix when the database is not at the head revision."""
    current = current_revision(engine)
    expected = head_revision()
    if current != expected:
        raise SchemaOutdatedError(
            f"database schema is at {current or 'nothing (empty database)'}, code needs "
            f"{expected}: run `alembic upgrade head` (or `maskd db upgrade`)"
        )


def upgrade_to_head(url: str) -> None:
    """Apply every pending migration to the database at ``url``."""
    command.upgrade(alembic_config(url), "head")


def downgrade_to(url: str, revision: str) -> None:
    """Undo migrations down to ``revision`` (``"base"`` empties the schema)."""
    command.downgrade(alembic_config(url), revision)
