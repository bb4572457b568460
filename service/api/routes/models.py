"""``/v1/models``: the project's registered students, teachers and stage-1 tokens, their
lineage, files and aliases.

All kinds are listed together (the ``maskd.kind`` tag tells them apart); a version's ``weights``
route serves its file, a student's or teacher's state dict or a tokens version's ``tokens.pt``.
A student's ``exports/{format}`` route serves its deployable copy (ONNX, ``torch.export``) and
``exports`` the report of their parity and latency (``maskd_core.export``).

Registration happens in the workers; these routes only read and move aliases (users promote a
version by pointing ``champion`` at it). A model of another project answers 404 like a missing
one. MLflow's client blocks on SQL or HTTP, so every call runs in the thread pool, counted in
``maskd_registry_operations_total`` under the ``ModelRegistry`` method's name.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

from fastapi import APIRouter, Body, HTTPException, Path, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import AfterValidator, BaseModel, Field
from starlette.concurrency import run_in_threadpool

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

from maskd_core.spec import ExportFormat
from service.api.deps import CurrentProject, MetricsDep, SettingsDep
from service.api.params import ModelVersionNumber, version_or_alias
from service.api.schemas import ModelVersionOut, RegisteredModelOut, error_responses
from service.metrics import ApiMetrics, RegistryOutcome
from service.model_registry import InvalidAliasError, ModelNotFoundError, ModelRegistry

router = APIRouter(prefix="/models", tags=["models"], responses=error_responses(404))

P = ParamSpec("P")
T = TypeVar("T")

VersionPath = Annotated[
    str,
    Path(
        pattern=r"^([0-9]{1,10}|@.+)$",
        description="A version number, or an alias written '@champion'.",
    ),
    AfterValidator(version_or_alias),
]


class ModelList(BaseModel):
    data: list[RegisteredModelOut]
    count: int


class VersionList(BaseModel):
    data: list[ModelVersionOut]
    count: int


class AliasUpdate(BaseModel):
    version: ModelVersionNumber = Field(
        pattern=r"^[0-9]+$", examples=["3"], description="Version number."
    )


@lru_cache(maxsize=4)
def _registry(tracking_uri: str) -> ModelRegistry:
    # One client per URI and process: MLflow caches its SQL engine per store anyway.
    return ModelRegistry(tracking_uri)


async def _call(
    metrics: ApiMetrics, method: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """A registry method in the thread pool, counted by its name and outcome."""
    outcome: RegistryOutcome = "error"
    try:
        result = await run_in_threadpool(method, *args, **kwargs)
        outcome = "ok"
    except ModelNotFoundError:
        outcome = "not_found"
        raise
    except InvalidAliasError:
        outcome = "invalid"
        raise
    finally:
        metrics.count_registry_operation(getattr(method, "__name__", "unknown"), outcome)
    return result


def _not_found(error: ModelNotFoundError) -> HTTPException:
    return HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=str(error))


async def _version_file(
    metrics: ApiMetrics,
    name: str,
    version: str,
    project: str,
    download: Callable[[str], pathlib.Path],
    registry: ModelRegistry,
) -> tuple[str, pathlib.Path]:
    """The version number ``version`` (a number or an alias) resolves to in ``project``, and
    the file ``download(number)`` fetches of it; 404 when either is missing, as for a model
    of another project. What the download routes share: weights and exports alike."""
    try:
        found = await _call(metrics, registry.version, project, name, version)
        number = str(found.version)
        return number, await _call(metrics, download, number)
    except ModelNotFoundError as error:
        raise _not_found(error) from None


@router.get("", response_model=ModelList, summary="Registered models of the caller's project")
async def list_models(
    project: CurrentProject, settings: SettingsDep, metrics: MetricsDep
) -> ModelList:
    registry = _registry(settings.mlflow_tracking_uri)
    models = await _call(metrics, registry.list_models, project.name)
    return ModelList(data=[RegisteredModelOut.from_entity(m) for m in models], count=len(models))


@router.get("/{name}/versions", response_model=VersionList, summary="Versions, newest first")
async def list_versions(
    name: str, project: CurrentProject, settings: SettingsDep, metrics: MetricsDep
) -> VersionList:
    registry = _registry(settings.mlflow_tracking_uri)
    try:
        versions = await _call(metrics, registry.list_versions, project.name, name)
    except ModelNotFoundError as error:
        raise _not_found(error) from None
    return VersionList(
        data=[ModelVersionOut.from_entity(version) for version in versions], count=len(versions)
    )


@router.get(
    "/{name}/versions/{version}",
    response_model=ModelVersionOut,
    summary="One version: lineage tags, the job's metrics and a link to its run",
)
async def get_version(
    name: str,
    version: VersionPath,
    project: CurrentProject,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> ModelVersionOut:
    registry = _registry(settings.mlflow_tracking_uri)
    try:
        found = await _call(metrics, registry.version, project.name, name, version)
    except ModelNotFoundError as error:
        raise _not_found(error) from None
    return await _described(registry, found, metrics)


async def _described(
    registry: ModelRegistry, version: ModelVersion, metrics: ApiMetrics
) -> ModelVersionOut:
    """The version with its run's metrics and link."""
    run = await _call(metrics, registry.run_of, version)
    return ModelVersionOut.from_entity(version, run, registry.tracking_uri)


@router.get(
    "/{name}/versions/{version}/weights",
    response_class=FileResponse,
    summary="The student's state dict (load with torch.load(path, weights_only=True))",
)
async def download_weights(
    name: str,
    version: VersionPath,
    project: CurrentProject,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> FileResponse:
    registry = _registry(settings.mlflow_tracking_uri)
    number, path = await _version_file(
        metrics,
        name,
        version,
        project.name,
        lambda found: registry.download_weights(
            project.name, name, found, settings.model_cache_dir
        ),
        registry,
    )
    return FileResponse(
        path, media_type="application/octet-stream", filename=f"{name}-v{number}.pt"
    )


ExportFormatPath = Annotated[
    ExportFormat, Path(description="The export's format: 'onnx' or 'torch_export' (.pt2).")
]


@router.get(
    "/{name}/versions/{version}/exports",
    response_model=dict[str, Any],
    summary="The student's export report: formats and their status, what the outputs "
    "contain, parity with the PyTorch student, tolerances and latencies",
)
async def get_export_report(
    name: str,
    version: VersionPath,
    project: CurrentProject,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> dict[str, Any]:
    registry = _registry(settings.mlflow_tracking_uri)
    try:
        return await _call(metrics, registry.export_report, project.name, name, version)
    except ModelNotFoundError as error:
        raise _not_found(error) from None


@router.get(
    "/{name}/versions/{version}/exports/{export_format}",
    response_class=FileResponse,
    summary="The student exported as ONNX (run it with onnxruntime) or a torch.export "
    "program (torch.export.load); 404 when it was refused (see the export report)",
)
async def download_export(
    name: str,
    version: VersionPath,
    export_format: ExportFormatPath,
    project: CurrentProject,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> FileResponse:
    registry = _registry(settings.mlflow_tracking_uri)
    number, path = await _version_file(
        metrics,
        name,
        version,
        project.name,
        lambda found: registry.download_export(
            project.name, name, found, export_format, settings.model_cache_dir
        ),
        registry,
    )
    return FileResponse(
        path, media_type="application/octet-stream", filename=f"{name}-v{number}{path.suffix}"
    )


@router.put(
    "/{name}/aliases/{alias}",
    response_model=ModelVersionOut,
    summary="Point an alias (e.g. champion) at a version; returns that version",
    responses=error_responses(400),
)
async def set_alias(
    name: str,
    alias: str,
    update: Annotated[AliasUpdate, Body()],
    project: CurrentProject,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> ModelVersionOut:
    registry = _registry(settings.mlflow_tracking_uri)
    try:
        moved = await _call(metrics, registry.set_alias, project.name, name, alias, update.version)
    except ModelNotFoundError as error:
        raise _not_found(error) from None
    except InvalidAliasError as error:
        raise RequestValidationError(
            [{"loc": ("path", "alias"), "msg": str(error), "type": "invalid_alias"}]
        ) from None
    return await _described(registry, moved, metrics)
