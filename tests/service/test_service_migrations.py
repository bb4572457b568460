"""Alembic migrations up and down on SQLite and PostgreSQL, and the schema check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, inspect, text

from service.db import (
    SchemaOutdatedError,
    alembic_config,
    check_schema_current,
    current_revision,
    downgrade_to,
    head_revision,
    make_engine,
    make_sessionmaker,
    upgrade_to_head,
)
from service.models import Base
from service.security import hash_api_key
from service.store import JobStore

TABLES = {
    "projects",
    "api_keys",
    "jobs",
    "job_events",
    "job_labels",
    "webhook_endpoints",
    "webhook_deliveries",
}


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_matches_the_models_and_downgrade_removes_everything(
    empty_database_url: str,
) -> None:
    engine = make_engine(empty_database_url)
    try:
        assert current_revision(engine) is None
        upgrade_to_head(empty_database_url)
        assert current_revision(engine) == head_revision()
        check_schema_current(engine)
        assert tables(engine) == TABLES == set(Base.metadata.tables)
        inspector = inspect(engine)
        for table in Base.metadata.sorted_tables:
            migrated = {column["name"] for column in inspector.get_columns(table.name)}
            assert migrated == set(table.columns.keys()), table.name

        downgrade_to(empty_database_url, "base")
        assert tables(engine) == set()
        assert current_revision(engine) is None

        upgrade_to_head(empty_database_url)
        assert tables(engine) == TABLES, "the migration can be applied again after a downgrade"
    finally:
        engine.dispose()


def columns(engine: Engine, table: str) -> set[str]:
    return {column["name"] for column in inspect(engine).get_columns(table)}


def test_api_key_expiry_and_revocation_migrate_up_and_down_keeping_the_keys(
    empty_database_url: str,
) -> None:
    """0002 adds ``expires_at`` and ``revoked_at`` to ``api_keys`` (SQLite rebuilds the table
    in batch mode): keys made before it keep working, and its downgrade keeps the rows."""
    command.upgrade(alembic_config(empty_database_url), "0001")
    engine = make_engine(empty_database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO projects (id, name, created_at) "
                    "VALUES ('p1', 'acme', CURRENT_TIMESTAMP)"
                )
            )
        assert "expires_at" not in columns(engine, "api_keys")
        with engine.begin() as connection:
            # What 0001's `create_api_key` wrote: no expiry, no revocation columns.
            connection.execute(
                text(
                    "INSERT INTO api_keys (id, project_id, prefix, key_hash, created_at) "
                    "VALUES ('k1', 'p1', 'abc123', :hash, CURRENT_TIMESTAMP)"
                ),
                {"hash": hash_api_key("mk_abc123_s")},
            )

        upgrade_to_head(empty_database_url)
        assert {"expires_at", "revoked_at"} <= columns(engine, "api_keys")
        store = JobStore(make_sessionmaker(engine))
        project = store.authenticate("mk_abc123_s")
        assert project is not None and project.name == "acme"
        [key] = store.list_api_keys()
        assert (key.id, key.prefix, key.expires_at, key.revoked_at) == ("k1", "abc123", None, None)

        downgrade_to(empty_database_url, "0001")
        assert current_revision(engine) == "0001"
        assert not {"expires_at", "revoked_at"} & columns(engine, "api_keys")
        with engine.connect() as connection:
            assert connection.execute(text("SELECT id, prefix FROM api_keys")).all() == [
                ("k1", "abc123")
            ]
    finally:
        engine.dispose()


def test_schema_check_names_the_fix(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    try:
        with pytest.raises(SchemaOutdatedError) as error:
            check_schema_current(engine)
    finally:
        engine.dispose()
    assert str(error.value) == (
        f"database schema is at nothing (empty database), code needs {head_revision()}: "
        "run `alembic upgrade head` (or `maskd db upgrade`)"
    )


def test_alembic_command_line_migrates_the_configured_database(empty_sqlite_url: str) -> None:
    """`alembic upgrade head` from the repository root reads MASKD_DATABASE_URL."""
    root = Path(__file__).resolve().parents[2]
    environment = {**os.environ, "MASKD_DATABASE_URL": empty_sqlite_url}
    subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(root / "alembic.ini"), "upgrade", "head"],
        cwd=root,
        env=environment,
        check=True,
        capture_output=True,
    )
    engine = make_engine(empty_sqlite_url)
    try:
        check_schema_current(engine)
    finally:
        engine.dispose()
