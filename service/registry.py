"""Tenant-scoped reads and alias moves over the MLflow Model Registry.

MLflow has no notion of our projects, so tenancy is carried by two marks that workers put on
every model they register: the name starts with ``<project>.`` (names are unique registry-wide,
so the prefix keeps two projects' job names from colliding) and the registered model carries
the tag ``maskd.project=<project>``. The tag is the authority: a model whose tag names another
project (or none) is answered exactly like a model that does not exist, so a caller cannot even
learn that another tenant's name is taken (404, never 403).

Every method here blocks on MLflow (SQL or HTTP); the API runs them in a thread. Workers reuse
the same class to resolve ``models:/`` teacher weights, so both sides agree on what "belongs to
the project" means.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

# MLflow reads this when it is imported; set before the import so no process of ours ever
# phones home (the service runs offline, and the lookup alone can hang there).
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException

PROJECT_TAG = "maskd.project"
"""Registered-model and run tag naming the owning project: the tenancy boundary."""

WEIGHTS_FILE = "student.pt"
"""File name of the state dict inside a registered student model's ``artifacts/`` folder."""

WEIGHTS_SHA256_TAG = "maskd.weights_sha256"
"""Version tag with the SHA-256 of the weights file, checked after every download."""

CANDIDATE_ALIAS = "candidate"
"""Alias a worker gives each new version; users promote by moving ``champion``."""


class ModelNotFoundError(LookupError):
    """No such model or version *for this project* (it may exist for another one)."""


class InvalidAliasError(ValueError):
    """MLflow refuses the alias name (e.g. ``latest`` or ``v3``, which read like versions)."""


class RegisteredModelOut(BaseModel):
    """A registered model as the API shows it."""

    name: str
    description: str | None
    tags: dict[str, str]
    aliases: dict[str, str]
    """Alias → version number."""
    created_at: datetime | None
    updated_at: datetime | None


class ModelVersionOut(BaseModel):
    """One version with its lineage: tags written at registration, metrics and run links."""

    name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    status: str
    source: str
    run_id: str | None
    experiment_id: str | None
    run_link: str | None
    """URL of the run in the MLflow UI when the tracking URI is a server, else None."""
    metrics: dict[str, float]
    """The latest value of each metric of the job's run (teacher/student mIoU and the like)."""
    created_at: datetime | None


def registered_model_name(project: str, job_name: str) -> str:
    """``<project>.<job name>-student``, with characters MLflow refuses in names replaced."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in job_name).strip("-")
    return f"{project}.{safe or 'job'}-student"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _millis(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value / 1000, tz=UTC) if value else None


def _is_missing(error: MlflowException) -> bool:
    # An unparsable name (e.g. one with '/') is as absent as an unknown one.
    return error.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


class ModelRegistry:
    """The registry as one project sees it. ``tracking_uri`` is always explicit."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def owned_model(self, project: str, name: str) -> RegisteredModel:
        """The registered model if ``project`` owns it, else ``ModelNotFoundError``."""
        if not name.startswith(f"{project}."):
            raise ModelNotFoundError(f"no model {name!r} in project {project!r}")
        try:
            model = self.client.get_registered_model(name)
        except MlflowException as error:
            if _is_missing(error):
                raise ModelNotFoundError(f"no model {name!r} in project {project!r}") from None
            raise
        if model.tags.get(PROJECT_TAG) != project:
            raise ModelNotFoundError(f"no model {name!r} in project {project!r}")
        return model

    def list_models(self, project: str) -> list[RegisteredModelOut]:
        return [self._model_out(model) for model in self._search_models(project)]

    def _search_models(self, project: str) -> Iterator[RegisteredModel]:
        # Filter on the tag, then re-check both marks: the filter is an optimisation, the
        # checks in Python are the boundary.
        quoted = project.replace("'", "\\'")
        token: str | None = None
        while True:
            page = self.client.search_registered_models(
                filter_string=f"tags.`{PROJECT_TAG}` = '{quoted}'",
                order_by=["name ASC"],
                page_token=token,
            )
            for model in page:
                if model.tags.get(PROJECT_TAG) == project and model.name.startswith(f"{project}."):
                    yield model
            token = page.token
            if not token:
                return

    def list_versions(self, project: str, name: str) -> list[ModelVersionOut]:
        self.owned_model(project, name)
        quoted = name.replace("'", "\\'")
        versions: list[ModelVersion] = []
        token: str | None = None
        while True:
            page = self.client.search_model_versions(
                filter_string=f"name = '{quoted}'", page_token=token
            )
            versions.extend(page)
            token = page.token
            if not token:
                break
        versions.sort(key=lambda mv: int(mv.version), reverse=True)
        return [self._version_out(mv, with_metrics=False) for mv in versions]

    def version(self, project: str, name: str, version: str) -> ModelVersion:
        """A version by number, or by alias when ``version`` starts with ``@``.

        Note that MLflow's SQL store gives ``ModelVersion.version`` as an int: callers use
        ``str(found.version)``.
        """
        self.owned_model(project, name)
        try:
            if version.startswith("@"):
                return self.client.get_model_version_by_alias(name, version[1:])
            return self.client.get_model_version(name, version)
        except MlflowException as error:
            if _is_missing(error):
                raise ModelNotFoundError(f"model {name!r} has no version {version!r}") from None
            raise

    def describe_version(self, project: str, name: str, version: str) -> ModelVersionOut:
        return self._version_out(self.version(project, name, version), with_metrics=True)

    def set_alias(self, project: str, name: str, alias: str, version: str) -> ModelVersionOut:
        """Point ``alias`` at ``version`` (a number), moving it from wherever it was."""
        found = self.version(project, name, version)
        try:
            self.client.set_registered_model_alias(name, alias, str(found.version))
        except MlflowException as error:
            if error.error_code == "INVALID_PARAMETER_VALUE":
                raise InvalidAliasError(error.message) from None
            raise
        return self.describe_version(project, name, str(found.version))

    def download_weights(self, project: str, name: str, version: str, cache_dir: Path) -> Path:
        """The version's state dict file, downloaded once into ``cache_dir`` and verified.

        Versions are immutable, so a cached file is keyed by (name, version) and reused; it is
        written under a temporary name and renamed, so a crash never leaves half a file that a
        later call would trust.
        """
        found = self.version(project, name, version)
        target = cache_dir / name / str(found.version) / WEIGHTS_FILE
        expected = found.tags.get(WEIGHTS_SHA256_TAG)
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
            downloaded = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{self._model_artifact_uri(found)}/artifacts/{WEIGHTS_FILE}",
                    dst_path=tmp,
                    tracking_uri=self.tracking_uri,
                )
            )
            if expected is not None and file_sha256(downloaded) != expected:
                raise RuntimeError(
                    f"weights of {name} version {found.version} do not match their recorded "
                    "SHA-256; the artifact store is corrupt"
                )
            shutil.move(downloaded, target)
        return target

    def _model_artifact_uri(self, mv: ModelVersion) -> str:
        # MLflow 3 registers LoggedModels: the source is ``models:/<model id>`` and the files
        # live under that model's own artifact root. (The SQL registry does not hand back
        # ``mv.model_id``, so it is read from the source.)
        source = str(mv.source)
        model_id = mv.model_id or (
            source.removeprefix("models:/") if source.startswith("models:/m-") else None
        )
        if model_id:
            return str(self.client.get_logged_model(model_id).artifact_location)
        return source

    def _model_out(self, model: RegisteredModel) -> RegisteredModelOut:
        return RegisteredModelOut(
            name=model.name,
            description=model.description or None,
            tags=dict(model.tags),
            aliases={alias: str(version) for alias, version in model.aliases.items()},
            created_at=_millis(model.creation_timestamp),
            updated_at=_millis(model.last_updated_timestamp),
        )

    def _version_out(self, mv: ModelVersion, *, with_metrics: bool) -> ModelVersionOut:
        experiment_id: str | None = None
        metrics: dict[str, float] = {}
        if mv.run_id and with_metrics:
            run = self.client.get_run(mv.run_id)
            experiment_id = run.info.experiment_id
            metrics = dict(run.data.metrics)
        run_link = None
        if experiment_id and self.tracking_uri.startswith(("http://", "https://")):
            base = self.tracking_uri.rstrip("/")
            run_link = f"{base}/#/experiments/{experiment_id}/runs/{mv.run_id}"
        return ModelVersionOut(
            name=mv.name,
            version=str(mv.version),
            aliases=list(mv.aliases),
            tags=dict(mv.tags),
            status=str(mv.status),
            source=str(mv.source),
            run_id=mv.run_id or None,
            experiment_id=experiment_id,
            run_link=run_link,
            metrics=metrics,
            created_at=_millis(mv.creation_timestamp),
        )
