"""Tenant-scoped reads and alias moves over the MLflow Model Registry.

MLflow has no notion of our projects, so tenancy is carried by two marks that workers put on
every model they register (``service.mlflow_names``): the name starts with ``<project>.`` and
the registered model carries the project tag. The tag is the authority: a model whose tag names
another project (or none) is answered exactly like a model that does not exist, so a caller
cannot even learn that another tenant's name is taken (404, never 403).

Three kinds of models live here (``MODEL_KIND_TAG``): distilled students, teachers trained by
teacher jobs (``<project>.<teacher>-teacher``), and the stage-1 tokens learned on a teacher
(``<project>.<teacher>-tokens``); all are listed, and a version's file is downloaded by the same
method whatever it holds.

Methods return MLflow's own entities; the API turns them into its schemas. Every method blocks
on MLflow (SQL or HTTP); the API runs them in a thread. Workers use the same class to resolve
``models:/`` teacher weights, so both sides agree on what "belongs to the project" means.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException

from maskd_core.files import file_sha256
from maskd_core.workdir import STUDENT_FILE, TEACHER_FILE, TOKENS_FILE
from service.mlflow_names import (
    MODEL_EXPORT_REPORT_ARTIFACT,
    MODEL_KIND_TAG,
    MODEL_TEACHER_WEIGHTS_ARTIFACT,
    MODEL_TOKENS_ARTIFACT,
    MODEL_WEIGHTS_ARTIFACT,
    PROJECT_TAG,
    STUDENT_KIND,
    TEACHER_KIND,
    TOKENS_KIND,
    TOKENS_SHA256_TAG,
    WEIGHTS_SHA256_TAG,
    export_sha256_tag,
    export_status_tag,
    has_project_prefix,
    model_export_artifact,
    quoted,
)

MAX_VERSION = 2**31 - 1
"""The largest version number MLflow's registry can hold (a 32-bit column); a larger one is
a version that cannot exist, not an error of the store."""

_VERSION_NUMBER = re.compile(r"[0-9]{1,10}")


def is_version_number(text: str) -> bool:
    """Whether ``text`` is a version number MLflow can hold: ASCII digits, at most MAX_VERSION."""
    return _VERSION_NUMBER.fullmatch(text) is not None and int(text) <= MAX_VERSION


def use_process_tracking_uri(tracking_uri: str) -> None:
    """Point MLflow's process-wide tracking and registry URIs at ``tracking_uri``.

    Some MLflow calls ignore the client they are made through and open a store from the
    process-wide URI: ``pyfunc.log_model``, and the download of a run's artifacts that belong
    to a logged model (MLflow 3 sends those to ``models:/<id>``, read through a new client).
    Left at its default, that URI is ``sqlite:///mlflow.db`` in the working directory: a
    registry nobody configured. A process works against one tracking URI (its settings'), so
    such calls set it first.
    """
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)


class ModelNotFoundError(LookupError):
    """No such model or version *for this project* (it may exist for another one)."""


class InvalidAliasError(ValueError):
    """MLflow refuses the alias name (e.g. ``latest`` or ``v3``, which read like versions)."""


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
        if not has_project_prefix(project, name):
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

    def list_models(self, project: str) -> list[RegisteredModel]:
        return list(self._search_models(project))

    def _search_models(self, project: str) -> Iterator[RegisteredModel]:
        # Filter on the tag, then re-check both marks: the filter is an optimisation, the
        # checks in Python are the boundary.
        token: str | None = None
        while True:
            page = self.client.search_registered_models(
                filter_string=f"tags.`{PROJECT_TAG}` = '{quoted(project)}'",
                order_by=["name ASC"],
                page_token=token,
            )
            for model in page:
                if model.tags.get(PROJECT_TAG) == project and has_project_prefix(
                    project, model.name
                ):
                    yield model
            token = page.token
            if not token:
                return

    def list_versions(self, project: str, name: str) -> list[ModelVersion]:
        """Newest first."""
        self.owned_model(project, name)
        versions: list[ModelVersion] = []
        token: str | None = None
        while True:
            page = self.client.search_model_versions(
                filter_string=f"name = '{quoted(name)}'", page_token=token
            )
            versions.extend(page)
            token = page.token
            if not token:
                break
        versions.sort(key=lambda mv: int(mv.version), reverse=True)
        return versions

    def version(self, project: str, name: str, version: str) -> ModelVersion:
        """A version by number, or by alias when ``version`` starts with ``@``.

        Note that MLflow's SQL store gives ``ModelVersion.version`` as an int: callers use
        ``str(found.version)``.
        """
        self.owned_model(project, name)
        if not version.startswith("@") and not is_version_number(version):
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}")
        try:
            if version.startswith("@"):
                return self.client.get_model_version_by_alias(name, version[1:])
            return self.client.get_model_version(name, version)
        except MlflowException as error:
            if _is_missing(error):
                raise ModelNotFoundError(f"model {name!r} has no version {version!r}") from None
            raise

    def run_of(self, version: ModelVersion) -> Run | None:
        """The run the version was registered from (its metrics are the job's)."""
        return self.client.get_run(version.run_id) if version.run_id else None

    def set_alias(self, project: str, name: str, alias: str, version: str) -> ModelVersion:
        """Point ``alias`` at ``version`` (a number), moving it from wherever it was."""
        found = self.version(project, name, version)
        try:
            self.client.set_registered_model_alias(name, alias, str(found.version))
        except MlflowException as error:
            if error.error_code == "INVALID_PARAMETER_VALUE":
                raise InvalidAliasError(error.message) from None
            raise
        return self.version(project, name, str(found.version))

    def download_weights(self, project: str, name: str, version: str, cache_dir: Path) -> Path:
        """The version's file, downloaded once into ``cache_dir`` and verified: a student's or
        a teacher's state dict, or a tokens model's tokens artifact (``maskd_core.tokens``).

        Versions are immutable, so a cached file is keyed by (name, version) and reused; it is
        written under a temporary name and renamed, so a crash never leaves half a file that a
        later call would trust.
        """
        model = self.owned_model(project, name)
        found = self.version(project, name, version)
        kind = model.tags.get(MODEL_KIND_TAG)
        if kind == TOKENS_KIND:
            artifact, file_name, checksum = MODEL_TOKENS_ARTIFACT, TOKENS_FILE, TOKENS_SHA256_TAG
        elif kind == TEACHER_KIND:
            artifact, file_name = MODEL_TEACHER_WEIGHTS_ARTIFACT, TEACHER_FILE
            checksum = WEIGHTS_SHA256_TAG
        else:
            artifact, file_name, checksum = MODEL_WEIGHTS_ARTIFACT, STUDENT_FILE, WEIGHTS_SHA256_TAG
        target = cache_dir / name / str(found.version) / file_name
        return self._download_verified(found, artifact, target, found.tags.get(checksum))

    def download_export(
        self, project: str, name: str, version: str, export_format: str, cache_dir: Path
    ) -> Path:
        """A student version's accepted export in ``export_format`` (``maskd_core.export``),
        downloaded once into ``cache_dir`` and verified like its weights. A version without
        one (refused, failed, not asked for, or no student) is ``ModelNotFoundError``, whose
        message says which."""
        model = self.owned_model(project, name)
        found = self.version(project, name, version)
        status = found.tags.get(export_status_tag(export_format))
        if model.tags.get(MODEL_KIND_TAG, STUDENT_KIND) != STUDENT_KIND or status is None:
            raise ModelNotFoundError(
                f"version {found.version} of {name!r} has no {export_format} export; students "
                "registered with export.formats listing it have one"
            )
        if status != "accepted":
            raise ModelNotFoundError(
                f"version {found.version} of {name!r} has no {export_format} export: it was "
                f"{status} (GET its export report for the numbers and the reason)"
            )
        artifact = model_export_artifact(export_format)
        target = cache_dir / name / str(found.version) / artifact
        expected = found.tags.get(export_sha256_tag(export_format))
        return self._download_verified(found, artifact, target, expected)

    def export_report(self, project: str, name: str, version: str) -> dict[str, Any]:
        """A student version's export report (formats, what the outputs contain, parity,
        tolerances, latencies); ``ModelNotFoundError`` for a version that has none."""
        model = self.owned_model(project, name)
        found = self.version(project, name, version)
        if model.tags.get(MODEL_KIND_TAG, STUDENT_KIND) != STUDENT_KIND:
            raise ModelNotFoundError(f"version {found.version} of {name!r} has no export report")
        with tempfile.TemporaryDirectory(prefix="maskd-export-report-") as tmp:
            try:
                path = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{self._model_artifact_uri(found)}/"
                    f"{MODEL_EXPORT_REPORT_ARTIFACT}",
                    dst_path=tmp,
                    tracking_uri=self.tracking_uri,
                )
            except (MlflowException, OSError):
                raise ModelNotFoundError(
                    f"version {found.version} of {name!r} has no export report; it was "
                    "registered before exports existed"
                ) from None
            report: dict[str, Any] = json.loads(Path(path).read_text())
        return report

    def _download_verified(
        self, found: ModelVersion, artifact: str, target: Path, expected: str | None
    ) -> Path:
        """``artifact`` of version ``found`` at ``target`` (kept: versions are immutable),
        checked against its recorded SHA-256 ``expected``."""
        name = found.name
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
            downloaded = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{self._model_artifact_uri(found)}/{artifact}",
                    dst_path=tmp,
                    tracking_uri=self.tracking_uri,
                )
            )
            if expected is not None and file_sha256(downloaded) != expected:
                raise RuntimeError(
                    f"the file of {name} version {found.version} do not match their recorded "
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
