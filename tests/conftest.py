"""Fixtures shared by every test package: databases, brokers and service settings.

Tests run against the real servers: a fresh SQLite file per test, a freshly created PostgreSQL
database per test (dropped afterwards) and a flushed Redis database. When PostgreSQL or Redis is
not running, the tests that need them are skipped with a message saying how to start it, unless
``MASKD_REQUIRE_SERVICES=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import OperationalError

from service.config import Settings
from service.db import (
    current_revision,
    head_revision,
    make_engine,
    make_sessionmaker,
    upgrade_to_head,
)
from service.models import Base
from service.store import JobStore

POSTGRES_URL = os.environ.get(
    "MASKD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("MASKD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
START_REDIS = (
    'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no'
)

_unavailable_services: dict[str, str] = {}


def _service_unavailable(name: str, url: str, error: Exception, how_to_start: str) -> None:
    """Skip (or, with MASKD_REQUIRE_SERVICES=1, fail) the test, saying how to fix it."""
    required = os.environ.get("MASKD_REQUIRE_SERVICES") == "1"
    reason = str(error).splitlines()[0]
    message = (
        f"{name.upper()} NOT REACHABLE at {url} ({type(error).__name__}: {reason}). "
        f"Tests that need it {'FAIL (MASKD_REQUIRE_SERVICES=1)' if required else 'are SKIPPED'}. "
        f"Start it with:  {how_to_start}  (or point MASKD_TEST_{name.upper()}_URL elsewhere)"
    )
    _unavailable_services[name] = message
    if required:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Repeat the missing-server warnings at the very end, where nobody can miss them."""
    for message in _unavailable_services.values():
        terminalreporter.write_sep("!", "service missing", red=True, bold=True)
        terminalreporter.write_line(message, red=True, bold=True)


# ------------------------------------------------------------------------ databases


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """The server-level URL, after checking once per session that PostgreSQL answers."""
    engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as error:
        _service_unavailable("postgres", POSTGRES_URL, error, START_POSTGRES)
    finally:
        engine.dispose()
    return POSTGRES_URL


def _scratch_postgres(admin_url: str, prefix: str, template: str | None = None) -> Iterator[str]:
    """A new PostgreSQL database (a copy of ``template`` when given), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"{copy}'))
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(scope="session")
def shared_postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """One database migrated to the head revision once per session.

    Creating a PostgreSQL database costs about 0.3 s here (it is fsync-bound), more than most
    tests; so tests share this one, emptied before each (``migrated_postgres_url``). The
    migrations themselves are tested on empty databases of their own.
    """
    for url in _scratch_postgres(postgres_admin_url, "maskd_test_shared"):
        upgrade_to_head(url)
        yield url


@pytest.fixture
def empty_postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database for this test only, dropped afterwards."""
    yield from _scratch_postgres(postgres_admin_url, "maskd_test")


@pytest.fixture
def migrated_postgres_url(shared_postgres_url: str) -> str:
    """The shared database at the head revision, with every table emptied for this test.

    Connections a previous test left open are ended first, so none can hold a lock the
    truncation waits for (the service's engines reconnect: ``pool_pre_ping``). A test that
    downgraded the schema (to see the API refuse it) leaves it for the next to upgrade again.
    """
    tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
    engine = create_engine(shared_postgres_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        if current_revision(engine) != head_revision():
            upgrade_to_head(shared_postgres_url)
        with engine.connect() as connection:
            connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()
    return shared_postgres_url


@pytest.fixture
def empty_sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'maskd.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database_url(request: pytest.FixtureRequest) -> str:
    """An empty database, once on SQLite and once on PostgreSQL."""
    url: str = request.getfixturevalue(f"empty_{request.param}_url")
    return url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to the head revision once per session, copied by each test."""
    path = tmp_path_factory.mktemp("template") / "maskd.db"
    upgrade_to_head(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    """A migrated SQLite database, for tests whose subject does not depend on the backend."""
    path = tmp_path / "maskd.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.slow])]
)
def database_url(request: pytest.FixtureRequest) -> str:
    """A database at the head revision, once on SQLite and once on PostgreSQL.

    The PostgreSQL run counts as slow: `make test-fast` checks the logic on SQLite, and
    `make test` (CI) checks it on both.
    """
    url: str = request.getfixturevalue(
        "sqlite_url" if request.param == "sqlite" else "migrated_postgres_url"
    )
    return url


# ------------------------------------------------------------------------ broker


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A flushed Redis database (``MASKD_TEST_REDIS_URL``, db 15 by default)."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as error:
        client.close()
        _service_unavailable("redis", REDIS_URL, error, START_REDIS)
    client.flushdb()
    try:
        yield REDIS_URL
    finally:
        client.flushdb()
        client.close()


# ------------------------------------------------------------------------ service


@pytest.fixture
def service_settings(database_url: str, tmp_path: Path) -> Settings:
    """Settings for an embedded deployment in ``tmp_path`` (filesystem broker) over
    ``database_url``; override fields with ``service_settings.model_copy(update=...)``."""
    return Settings(
        database_url=database_url,
        broker_url="filesystem://",
        data_dir=tmp_path / "var",
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        sse_poll_interval_seconds=0.05,
    )


@pytest.fixture
def job_store(database_url: str) -> Iterator[JobStore]:
    """A store over the migrated ``database_url``."""
    engine = make_engine(database_url)
    try:
        yield JobStore(make_sessionmaker(engine))
    finally:
        engine.dispose()
