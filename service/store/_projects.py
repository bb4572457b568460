"""Projects and API keys: who a request belongs to.

Separate from the job queries because tenancy has its own concerns (create-if-missing races on
the project name, constant-cost key checks) and touches no job rows.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import bindparam, or_, select
from sqlalchemy.exc import IntegrityError

from service import security
from service.models import ApiKey, Project
from service.store._base import StoreBase
from service.store._records import (
    ApiKeyExpired,
    ApiKeyNotFound,
    ApiKeyRecord,
    ApiKeyRevoked,
    ProjectRecord,
    api_key_record,
    project_record,
)

_keys, _projects = ApiKey.__table__, Project.__table__
_KEY_BY_PREFIX = (
    select(
        _keys.c.prefix,
        _keys.c.key_hash,
        _keys.c.revoked_at,
        _keys.c.expires_at,
        _projects.c.id,
        _projects.c.name,
        _projects.c.created_at,
    )
    .join(_projects, _projects.c.id == _keys.c.project_id)
    .where(_keys.c.prefix == bindparam("prefix"))
)
"""The key check's one statement, built once: every authenticated request runs it."""

# Compared against when a key's prefix is unknown, so that case costs the same as a bad secret.
_UNKNOWN_KEY_HASH = security.hash_api_key("mk_unknown_unknown")


class ProjectsMixin(StoreBase):
    """``JobStore``'s project and API-key methods."""

    def create_project(self, name: str) -> ProjectRecord:
        """The project called ``name``, created if it does not exist yet."""
        existing = self._project_by_name(name)
        if existing is not None:
            return existing
        try:
            with self._sessions.begin() as session:
                project = Project(id=str(uuid.uuid4()), name=name, created_at=self._clock())
                session.add(project)
                return project_record(project)
        except IntegrityError:
            # Created concurrently under the same name: that one is the project.
            raced = self._project_by_name(name)
            if raced is None:
                raise
            return raced

    def create_api_key(self, project_name: str, *, expires_at: datetime | None = None) -> str:
        """A new key for the project (created if missing). The plaintext is returned once
        and only its hash is kept, so a lost key is replaced, never recovered.

        With ``expires_at`` (an aware time, later than now) the key stops working then.
        """
        now = self._clock()
        if expires_at is not None and (expires_at.tzinfo is None or expires_at <= now):
            raise ValueError(
                f"expires_at must be a time zone-aware moment after now ({now.isoformat()}), "
                f"got {expires_at.isoformat()}"
            )
        project = self.create_project(project_name)
        generated = security.generate_api_key()
        with self._sessions.begin() as session:
            session.add(
                ApiKey(
                    id=str(uuid.uuid4()),
                    project_id=project.id,
                    prefix=generated.prefix,
                    key_hash=generated.key_hash,
                    created_at=now,
                    expires_at=expires_at,
                )
            )
        return generated.plaintext

    def authenticate(self, key: str) -> ProjectRecord | None:
        """The project a key belongs to, or None for an unknown, malformed or wrong key.

        The key's row is read on every call, so a revocation counts from the next request.
        A key whose secret matches but which was revoked or has expired raises
        ``ApiKeyRevoked`` or ``ApiKeyExpired``. Every path compares one hash, so the time
        taken does not tell an unknown prefix from a wrong secret.
        """
        prefix = security.key_prefix(key)
        wanted = {"prefix": prefix or ""}
        row = self._autocommit(
            lambda connection: connection.execute(_KEY_BY_PREFIX, wanted).one_or_none()
        )
        if row is None:
            security.key_matches(key, _UNKNOWN_KEY_HASH)
            return None
        if not security.key_matches(key, row.key_hash):
            return None
        if row.revoked_at is not None:
            raise ApiKeyRevoked(row.prefix, row.revoked_at)
        if row.expires_at is not None and row.expires_at <= self._clock():
            raise ApiKeyExpired(row.prefix, row.expires_at)
        return ProjectRecord(id=row.id, name=row.name, created_at=row.created_at)

    def list_api_keys(self, project_name: str | None = None) -> list[ApiKeyRecord]:
        """Every key (of ``project_name`` only, when given), oldest first; revoked and
        expired keys included. An unknown project has no keys."""
        query = select(ApiKey, Project).join(Project, Project.id == ApiKey.project_id)
        if project_name is not None:
            query = query.where(Project.name == project_name)
        query = query.order_by(ApiKey.created_at, ApiKey.id)
        with self._sessions.begin() as session:
            return [api_key_record(api_key, project) for api_key, project in session.execute(query)]

    def revoke_api_key(self, id_or_prefix: str) -> tuple[ApiKeyRecord, bool]:
        """Revoke the key with this id or prefix (``abc123``, ``mk_abc123`` or the whole key);
        returns ``(key, revoked_now)``. Revoking a revoked key changes nothing (its first
        revocation time is kept; ``revoked_now`` is False). Raises ``ApiKeyNotFound``."""
        wanted = id_or_prefix.strip()
        prefix = security.key_prefix(wanted) or security.key_prefix(f"{wanted}_x") or wanted
        with self._sessions.begin() as session:
            row = session.execute(
                select(ApiKey, Project)
                .join(Project, Project.id == ApiKey.project_id)
                .where(or_(ApiKey.id == wanted, ApiKey.prefix == prefix))
                .with_for_update(of=ApiKey)
            ).one_or_none()
            if row is None:
                raise ApiKeyNotFound(id_or_prefix)
            api_key, project = row
            revoked_now = api_key.revoked_at is None
            if revoked_now:
                api_key.revoked_at = self._clock()
            return api_key_record(api_key, project), revoked_now

    def get_project(self, project_id: str) -> ProjectRecord | None:
        """The project by id: workers need its name, the tenant key in MLflow's registry."""
        with self._sessions.begin() as session:
            project = session.get(Project, project_id)
            return None if project is None else project_record(project)

    def _project_by_name(self, name: str) -> ProjectRecord | None:
        with self._sessions.begin() as session:
            project = session.scalars(select(Project).where(Project.name == name)).one_or_none()
            return None if project is None else project_record(project)
