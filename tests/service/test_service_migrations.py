"""Alembic migrations up and down on SQLite and PostgreSQL, and the schema check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect

from service.db import (
    SchemaOutdatedError,
    check_schema_current,
    current_revision,
    downgrade_to,
    head_revision,
    make_engine,
    upgrade_to_head,
)
from service.models import Base

TABLES = {"projects", "api_keys", "jobs", "job_events"}


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
