"""API keys: expiry, listing and revocation, through the store, the API and `maskd admin`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from service_testkit import Api, FakeClock

from maskd_cli import main
from service.config import get_settings
from service.db import make_engine, make_sessionmaker
from service.store import (
    ApiKeyExpired,
    ApiKeyNotFound,
    ApiKeyRecord,
    ApiKeyRevoked,
    JobStore,
    utcnow,
)


def prefix_of(key: str) -> str:
    return key.split("_")[1]


# ------------------------------------------------------------------------ store


def test_listed_keys_show_everything_but_the_secret(job_store: JobStore) -> None:
    acme = job_store.create_api_key("acme")
    expires = utcnow() + timedelta(days=30)
    globex = job_store.create_api_key("globex", expires_at=expires)

    keys = job_store.list_api_keys()
    assert [(key.prefix, key.project_name) for key in keys] == [
        (prefix_of(acme), "acme"),
        (prefix_of(globex), "globex"),
    ]
    assert keys[0].expires_at is None and keys[0].revoked_at is None
    assert keys[1].expires_at == expires
    assert keys[1].display_prefix == f"mk_{prefix_of(globex)}"
    assert {field.name for field in dataclasses.fields(ApiKeyRecord)} == {
        "id",
        "prefix",
        "project_id",
        "project_name",
        "created_at",
        "expires_at",
        "revoked_at",
    }, "nothing secret (key, hash) is handed out"
    assert all(key.status(utcnow()) == "active" for key in keys)

    assert [key.project_name for key in job_store.list_api_keys("globex")] == ["globex"]
    assert job_store.list_api_keys("no-such-project") == []


def test_revocation_counts_from_the_very_next_check(job_store: JobStore) -> None:
    key = job_store.create_api_key("acme")
    other = job_store.create_api_key("acme")
    assert job_store.authenticate(key) is not None

    revoked, revoked_now = job_store.revoke_api_key(prefix_of(key))
    assert revoked_now and revoked.revoked_at is not None
    assert revoked.status(utcnow()) == "revoked"
    with pytest.raises(ApiKeyRevoked, match=f"mk_{prefix_of(key)} was revoked at"):
        job_store.authenticate(key)
    assert job_store.authenticate(other) is not None, "only that key is revoked"

    # Only the whole, correct key learns that it was revoked; a guess is just unknown.
    assert job_store.authenticate(f"mk_{prefix_of(key)}_guessed") is None

    again, revoked_now = job_store.revoke_api_key(revoked.id)
    assert not revoked_now and again.revoked_at == revoked.revoked_at, "first time kept"


@pytest.mark.parametrize("form", ["id", "prefix", "mk_prefix", "whole key"])
def test_a_key_is_revoked_by_its_id_or_prefix(job_store: JobStore, form: str) -> None:
    key = job_store.create_api_key("acme")
    [record] = job_store.list_api_keys()
    given = {
        "id": record.id,
        "prefix": record.prefix,
        "mk_prefix": record.display_prefix,
        "whole key": key,
    }[form]
    assert job_store.revoke_api_key(given)[0].id == record.id
    with pytest.raises(ApiKeyRevoked):
        job_store.authenticate(key)


def test_revoking_an_unknown_key_says_how_to_find_one(job_store: JobStore) -> None:
    job_store.create_api_key("acme")
    with pytest.raises(ApiKeyNotFound, match="list-keys"):
        job_store.revoke_api_key("0123456789ab")


def test_a_key_expires_at_its_moment(clocked_store: JobStore, clock: FakeClock) -> None:
    key = clocked_store.create_api_key("acme", expires_at=clock.now + timedelta(hours=1))
    assert clocked_store.authenticate(key) is not None
    clock.advance(3599)
    assert clocked_store.authenticate(key) is not None
    clock.advance(1)
    with pytest.raises(ApiKeyExpired, match=f"mk_{prefix_of(key)} expired at") as error:
        clocked_store.authenticate(key)
    assert error.value.at == clock.now
    [record] = clocked_store.list_api_keys()
    assert record.status(clock.now) == "expired"


def test_an_expiry_must_be_in_the_future_and_aware(
    clocked_store: JobStore, clock: FakeClock
) -> None:
    with pytest.raises(ValueError, match="after now"):
        clocked_store.create_api_key("acme", expires_at=clock.now)
    with pytest.raises(ValueError, match="zone-aware"):
        clocked_store.create_api_key("acme", expires_at=datetime(2031, 1, 1))
    assert clocked_store.list_api_keys() == []


# ------------------------------------------------------------------------ API


def test_a_revoked_key_is_401_on_its_very_next_request(api: Api) -> None:
    assert api.http.get("/v1/jobs", headers=api.headers()).status_code == 200
    api.store.revoke_api_key(prefix_of(api.key))

    response = api.http.get("/v1/jobs", headers=api.headers())
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    detail = response.json()["detail"]
    assert f"mk_{prefix_of(api.key)} was revoked at" in detail
    assert "maskd admin create-key" in detail, "says how to get a new key"
    assert "acme" not in detail and "globex" not in detail, "names no project"
    assert api.http.get("/v1/models", headers=api.headers()).status_code == 401
    assert api.http.get("/v1/jobs", headers=api.headers(api.other_key)).status_code == 200


def test_an_expired_key_is_401_saying_it_expired(api: Api) -> None:
    # Made by a store whose clock is two days behind, expiring a day after that "now": the
    # API, on real time, finds it expired a day ago.
    clock = FakeClock()
    clock.now = utcnow() - timedelta(days=2)
    engine = make_engine(api.settings.database_url)
    try:
        behind = JobStore(make_sessionmaker(engine), clock=clock)
        key = behind.create_api_key("acme", expires_at=clock.now + timedelta(days=1))
    finally:
        engine.dispose()

    response = api.http.get("/v1/jobs", headers=api.headers(key))
    assert response.status_code == 401
    detail = response.json()["detail"]
    assert f"mk_{prefix_of(key)} expired at" in detail
    assert "maskd admin create-key" in detail and "acme" not in detail
    assert api.http.get("/v1/jobs", headers=api.headers()).status_code == 200


# ------------------------------------------------------------------------ CLI


@pytest.fixture
def admin_cli(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`maskd admin …` reads its database from MASKD_DATABASE_URL, as deployed."""
    monkeypatch.setenv("MASKD_DATABASE_URL", database_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def admin(*args: str) -> int:
    return main(["admin", *args])


@pytest.mark.usefixtures("admin_cli")
def test_create_list_and_revoke_keys_with_the_cli(
    job_store: JobStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert admin("create-key", "--project", "acme", "--expires-in", "30d") == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("mk_") and "expires at" in err
    assert admin("create-key", "--project", "globex", "--expires-at", "2999-01-31T00:00:00Z") == 0
    other_key = capsys.readouterr().out.strip()
    assert admin("create-key", "--project", "globex") == 0
    capsys.readouterr()

    [acme_record] = job_store.list_api_keys("acme")
    expected_expiry = utcnow() + timedelta(days=30)
    assert acme_record.expires_at is not None
    assert abs(acme_record.expires_at - expected_expiry) < timedelta(minutes=1)
    assert [key.expires_at for key in job_store.list_api_keys("globex")] == [
        datetime(2999, 1, 31, tzinfo=UTC),
        None,
    ]

    assert admin("list-keys") == 0
    listing = capsys.readouterr().out
    header, *rows = listing.splitlines()
    assert header.split() == ["ID", "PREFIX", "PROJECT", "CREATED", "EXPIRES", "REVOKED", "STATUS"]
    assert len(rows) == 3
    assert acme_record.id in listing and f"mk_{prefix_of(key)}" in listing
    assert "2999-01-31T00:00:00Z" in listing and "never" in listing
    assert key not in listing and other_key not in listing, "never the secret"
    assert key.rsplit("_", 1)[1] not in listing

    assert admin("list-keys", "--project", "acme") == 0
    [_, acme_row] = capsys.readouterr().out.splitlines()
    assert acme_row.split()[:3] == [acme_record.id, f"mk_{prefix_of(key)}", "acme"]
    assert acme_row.split()[-1] == "active"

    assert admin("revoke-key", f"mk_{prefix_of(key)}") == 0
    assert f"revoked mk_{prefix_of(key)}" in capsys.readouterr().out
    with pytest.raises(ApiKeyRevoked):  # the next request with it is refused
        job_store.authenticate(key)
    assert job_store.authenticate(other_key) is not None
    assert admin("revoke-key", acme_record.id) == 0
    assert "already revoked" in capsys.readouterr().out

    assert admin("list-keys", "--project", "acme") == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "revoked"


@pytest.mark.usefixtures("admin_cli")
def test_admin_cli_errors_say_what_to_do(
    job_store: JobStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert admin("revoke-key", "0123456789ab") == 1
    assert "list-keys" in capsys.readouterr().err
    assert admin("create-key", "--project", "acme", "--expires-at", "2001-01-01") == 2
    assert "in the past" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        admin("create-key", "--project", "acme", "--expires-in", "30 days")
    assert "not a duration" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        admin("create-key", "--project", "acme", "--expires-in", "1d", "--expires-at", "2999-01-01")
    assert "not allowed with" in capsys.readouterr().err
    assert job_store.list_api_keys() == [], "no key was made"
    assert admin("list-keys", "--project", "nobody") == 0
    assert "no API keys for project 'nobody'" in capsys.readouterr().err
