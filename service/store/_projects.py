"""Projects and API keys: who a request belongs to.

Separate from the job queries because tenancy has its own concerns (create-if-missing races on
the project name, constant-cost key checks). The one job it reads is the API's hot read, which
checks the key and reads the job in one statement (``service.store._reads``).
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError

from service import security
from service.models import ApiKey, Project
from service.store._base import StoreBase
from service.store._reads import (
    KEY_BY_PREFIX,
    KEY_WITH_JOB,
    KEY_WITH_QUOTA_USE,
    JobFilter,
    job_from_rows,
    key_params,
    project_for_key,
    submitter_for_key,
)
from service.store._records import (
    ApiKeyNotFound,
    ApiKeyRecord,
    JobQuotas,
    JobRecord,
    ProjectRecord,
    api_key_record,
    project_record,
)


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
        A revoked or expired key raises ``ApiKeyRevoked`` or ``ApiKeyExpired``
        (``project_for_key`` has the rules).
        """
        row = self._autocommit(
            lambda connection: connection.execute(KEY_BY_PREFIX, key_params(key)).one_or_none()
        )
        return project_for_key(key, row, self._clock())

    def job_for_key(self, key: str, job_id: str) -> tuple[ProjectRecord | None, JobRecord | None]:
        """``authenticate(key)`` and, for a valid key, its project's job ``job_id`` (None when
        it is not that project's): one statement."""
        params = {**key_params(key), "job_id": job_id}
        rows = self._autocommit(lambda connection: connection.execute(KEY_WITH_JOB, params).all())
        project = project_for_key(key, rows[0] if rows else None, self._clock())
        return project, None if project is None else job_from_rows(rows)

    def submitter_for_key(
        self, key: str, idempotency_key: str | None, quotas: JobQuotas
    ) -> ProjectRecord | None:
        """``authenticate(key)`` and the early quota check of a submission (``QuotaExceeded``;
        not for a replay of ``idempotency_key``): one statement."""
        params = {**key_params(key), "idempotency_key": idempotency_key}
        row = self._autocommit(
            lambda connection: connection.execute(KEY_WITH_QUOTA_USE, params).one_or_none()
        )
        return submitter_for_key(key, row, self._clock(), quotas)

    def jobs_for_key(
        self, key: str, page: JobFilter
    ) -> tuple[ProjectRecord | None, list[JobRecord], str | None]:
        """``authenticate(key)`` and, for a valid key, one page of its project's jobs and the
        next page's cursor: one statement. Raises ``InvalidCursor`` for a foreign cursor."""
        params, statement = page.params_for_key(key), page.statement_for_key()
        rows = self._autocommit(lambda connection: connection.execute(statement, params).all())
        project = project_for_key(key, rows[0] if rows else None, self._clock())
        if project is None:
            return None, [], None
        return project, *page.page(rows)

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
