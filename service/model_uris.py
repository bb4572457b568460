"""Weights from the Model Registry: ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION``.

A job spec may name a registered model (typically an earlier job's student) instead of a local
file. The stored spec keeps the URI, so the job's record says what the user asked for; the API
resolves it to check it early (422 naming the field), and the worker resolves it again right
before running, because an alias may have moved in between. Resolution downloads the weights
into a cache under the data directory and returns a copy of the spec with the local path, the
only form ``maskd_core`` understands (the core never talks to MLflow).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from maskd_core.errors import SpecError
from maskd_core.spec import JobSpec, ModelSpec
from service.mlflow_names import VERSION_ARCH_TAG
from service.model_registry import ModelNotFoundError, ModelRegistry, is_version_number

MODELS_SCHEME = "models:/"


@dataclass(frozen=True)
class RegistryReference:
    """A parsed ``models:/`` URI: a model name and either a version number or an alias."""

    name: str
    version: str | None
    alias: str | None

    @property
    def selector(self) -> str:
        """What ``ModelRegistry.version`` takes: the number, or ``@alias``."""
        return self.version if self.version is not None else f"@{self.alias}"


def parse_model_uri(uri: str, field: str) -> RegistryReference | None:
    """The reference a ``models:/`` URI names, None for any other string (a local path)."""
    if not uri.startswith(MODELS_SCHEME):
        return None
    rest = uri[len(MODELS_SCHEME) :]
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if name and alias and "/" not in rest:
            return RegistryReference(name=name, version=None, alias=alias)
    else:
        name, _, version = rest.partition("/")
        if name and is_version_number(version):
            return RegistryReference(name=name, version=version, alias=None)
    raise SpecError(
        f"{uri!r} is not a registry reference; write models:/NAME@ALIAS (e.g. "
        "models:/myproject.job-student@champion) or models:/NAME/VERSION (e.g. "
        "models:/myproject.job-student/3)",
        field=field,
    )


def resolve_registry_weights(
    spec: JobSpec, project: str, tracking_uri: str, cache_dir: Path
) -> JobSpec:
    """``spec`` with every ``models:/`` weight replaced by a local file of ``project``'s model.

    A model of another project is reported exactly like a missing one, so the error cannot be
    used to probe other tenants' model names.
    """
    updates: dict[str, ModelSpec] = {}
    registry: ModelRegistry | None = None
    for role in ("teacher", "student"):
        model_spec: ModelSpec = getattr(spec, role)
        field = f"{role}.weights"
        reference = parse_model_uri(model_spec.weights, field) if model_spec.weights else None
        if reference is None:
            continue
        registry = registry or ModelRegistry(tracking_uri)
        try:
            version = registry.version(project, reference.name, reference.selector)
            path = registry.download_weights(
                project, reference.name, str(version.version), cache_dir
            )
        except ModelNotFoundError:
            raise SpecError(
                f"{model_spec.weights!r} does not name a registered model version of project "
                f"{project!r}; list yours with GET /v1/models",
                field=field,
            ) from None
        registered_arch = version.tags.get(VERSION_ARCH_TAG)
        if registered_arch is not None and registered_arch != model_spec.arch:
            raise SpecError(
                f"{model_spec.weights!r} holds weights of a {registered_arch!r}, but "
                f"{role}.arch is {model_spec.arch!r}; set {role}.arch to {registered_arch!r}",
                field=f"{role}.arch",
            )
        updates[role] = model_spec.model_copy(update={"weights": str(path)})
    return spec.model_copy(update=updates) if updates else spec
