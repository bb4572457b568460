"""Projects and API keys: who a request belongs to.

Separate from the job queries because tenancy has its own concerns (create-if-missing races on
the project name, constant-cost key checks) and touches no job rows.
"""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from service import security
from service.models import ApiKey, Project
from service.store._base import StoreBase
from service.store._records import ProjectRecord, project_record

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

    def create_api_key(self, project_name: str) -> str:
        """A new key for the project (created if missing). The plaintext is returned once
        and only its hash is kept, so a lost key is replaced, never recovered."""
        project = self.create_project(project_name)
        generated = security.generate_api_key()
        with self._sessions.begin() as session:
            session.add(
                ApiKey(
                    id=str(uuid.uuid4()),
                    project_id=project.id,
                    prefix=generated.prefix,
                    key_hash=generated.key_hash,
                    created_at=self._clock(),
                )
            )
        return generated.plaintext

    def authenticate(self, key: str) -> ProjectRecord | None:
        """The project a key belongs to, or None for an unknown, malformed or wrong key."""
        prefix = security.key_prefix(key)
        with self._sessions.begin() as session:
            row = session.execute(
                select(ApiKey, Project)
                .join(Project, Project.id == ApiKey.project_id)
                .where(ApiKey.prefix == (prefix or ""))
            ).one_or_none()
        if row is None:
            security.key_matches(key, _UNKNOWN_KEY_HASH)
            return None
        api_key, project = row
        if not security.key_matches(key, api_key.key_hash):
            return None
        return project_record(project)

    def get_project(self, project_id: str) -> ProjectRecord | None:
        """The project by id: workers need its name, the tenant key in MLflow's registry."""
        with self._sessions.begin() as session:
            project = session.get(Project, project_id)
            return None if project is None else project_record(project)

    def _project_by_name(self, name: str) -> ProjectRecord | None:
        with self._sessions.begin() as session:
            project = session.scalars(select(Project).where(Project.name == name)).one_or_none()
            return None if project is None else project_record(project)
