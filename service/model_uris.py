"""Weights from the Model Registry: ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION``.

A job spec may name a registered model (an earlier job's student, or the teacher a teacher job
trained: ``models:/<project>.<arch>-teacher@candidate``) instead of a local file. The stored
spec keeps the URI, so the job's record says what the user asked for; the API resolves it to
check it early (422 naming the field), and the worker resolves it again right before running,
because an alias may have moved in between. Resolution downloads the weights into a cache under
the data directory and returns a copy of the spec with the local path, the only form
``maskd_core`` understands (the core never talks to MLflow).

``stage1.from_model`` names a registered *tokens* version the same way. It is checked here
against the job from the version's tags (kind, teacher architecture, layers, token count, mask
weighting), so a mismatch is a 422 at submission; the worker downloads it
(``workers.token_reuse``) and the spec keeps the URI, since the core reads tokens from the work
directory, not from the spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from maskd_core.errors import SpecError
from maskd_core.spec import JobSpec, ModelSpec
from service.mlflow_names import (
    MODEL_KIND_TAG,
    STUDENT_KIND,
    TEACHER_KIND,
    TOKENS_COUNT_TAG,
    TOKENS_KIND,
    TOKENS_MASK_WEIGHTING_TAG,
    TOKENS_TEACHER_LAYERS_TAG,
    VERSION_ARCH_TAG,
    VERSION_TEACHER_ARCH_TAG,
    tokens_model_name,
)
from service.model_registry import ModelNotFoundError, ModelRegistry, is_version_number

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

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
    """``spec`` with every ``models:/`` weight replaced by a local file of ``project``'s model,
    and its ``stage1.from_model`` checked (``registered_tokens``).

    A model of another project is reported exactly like a missing one, so the error cannot be
    used to probe other tenants' model names.
    """
    resolved = _resolve_weights(spec, project, tracking_uri, cache_dir)
    if spec.stage1.from_model is not None:
        registered_tokens(spec.stage1.from_model, spec, project, ModelRegistry(tracking_uri))
    return resolved


def _resolve_weights(spec: JobSpec, project: str, tracking_uri: str, cache_dir: Path) -> JobSpec:
    updates: dict[str, ModelSpec] = {}
    registry: ModelRegistry | None = None
    for role in ("teacher", "student"):
        model_spec: ModelSpec | None = getattr(spec, role)
        if model_spec is None:  # a teacher job has no student
            continue
        field = f"{role}.weights"
        reference = parse_model_uri(model_spec.weights, field) if model_spec.weights else None
        if reference is None:
            continue
        registry = registry or ModelRegistry(tracking_uri)
        try:
            holds_tokens = (
                registry.owned_model(project, reference.name).tags.get(MODEL_KIND_TAG)
                == TOKENS_KIND
            )
            if holds_tokens:
                raise SpecError(
                    f"{model_spec.weights!r} holds stage-1 tokens, not network weights; name a "
                    "student or teacher model here, and tokens as stage1.from_model",
                    field=field,
                )
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


TOKENS_FIELD = "stage1.from_model"


def registered_tokens(
    uri: str, spec: JobSpec, project: str, registry: ModelRegistry
) -> ModelVersion:
    """The tokens version ``uri`` names, if it is ``project``'s and fits the job's stage 1.

    Checked from the version's tags, without downloading: that it holds tokens (not a
    student), and that the teacher architecture, tapped layers, token count and mask weighting
    it was learned with are the job's. The teacher's weights are compared by the worker
    (``workers.token_reuse``), after it has checked the teacher's path is the project's to read.
    """
    reference = parse_model_uri(uri, TOKENS_FIELD)
    if reference is None:
        raise SpecError(
            f"{uri!r} is not a registry reference; write "
            f"models:/{tokens_model_name(project, spec.teacher.arch)}@ALIAS or .../VERSION",
            field=TOKENS_FIELD,
        )
    try:
        model = registry.owned_model(project, reference.name)
        version = registry.version(project, reference.name, reference.selector)
    except ModelNotFoundError:
        raise SpecError(
            f"{uri!r} does not name a registered tokens version of project {project!r}; list "
            "yours with GET /v1/models (tokens models are named "
            f"{tokens_model_name(project, spec.teacher.arch)!r})",
            field=TOKENS_FIELD,
        ) from None
    kind = model.tags.get(MODEL_KIND_TAG, STUDENT_KIND)
    if kind != TOKENS_KIND:
        holds = "trained teachers" if kind == TEACHER_KIND else "distilled students"
        raise SpecError(
            f"{uri!r} is a model of {holds}, not of stage-1 tokens; name a version of "
            f"{tokens_model_name(project, spec.teacher.arch)!r}",
            field=TOKENS_FIELD,
        )
    _check_tokens_fit(uri, version, spec)
    return version


def _check_tokens_fit(uri: str, version: ModelVersion, spec: JobSpec) -> None:
    """A ``SpecError`` naming the first property the tokens were learned with that differs
    from the job, the field to change and the alternative (learn new tokens)."""
    learned = {
        "teacher.arch": version.tags.get(VERSION_TEACHER_ARCH_TAG),
        "teacher.layers": json.loads(version.tags.get(TOKENS_TEACHER_LAYERS_TAG, "null")),
        "stage1.tokens": int(version.tags.get(TOKENS_COUNT_TAG, "0")),
        "stage1.mask_weighting": version.tags.get(TOKENS_MASK_WEIGHTING_TAG) == "true",
    }
    wanted = {
        "teacher.arch": spec.teacher.arch,
        "teacher.layers": spec.teacher.layers,
        "stage1.tokens": spec.stage1.tokens,
        "stage1.mask_weighting": spec.stage1.mask_weighting,
    }
    for field, value in wanted.items():
        # Layers left out are the registry's defaults: the worker, which can read the
        # registry, resolves them and runs this check again before it reuses the tokens.
        if value is not None and learned[field] != value:
            raise SpecError(
                f"{uri!r} ({version.name} version {version.version}) was learned with {field} = "
                f"{json.dumps(learned[field])}, but this job has {json.dumps(value)}; set "
                f"{field} to match, name tokens learned with it, or drop stage1.from_model to "
                "learn tokens",
                field=TOKENS_FIELD,
            )


def names_registered_models(spec: JobSpec) -> bool:
    """Whether ``resolve_registry_weights`` has anything to look up: a ``models:/`` weight or
    ``stage1.from_model``. Without one it returns the spec as it is, and the API skips it."""
    weights = [model.weights or "" for model in (spec.teacher, spec.student) if model is not None]
    return spec.stage1.from_model is not None or any(
        weight.startswith(MODELS_SCHEME) for weight in weights
    )
