"""Models by name: the registry, building from a ``ModelSpec`` and safe weight loading.

A builder takes its validated argument model and the dataset's class count and returns an
``nn.Module``. Weights are plain state dicts read with ``torch.load(weights_only=True)``: a job
spec never causes code to be imported or unpickled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskd_core.errors import SpecError
from maskd_core.registry import DefaultTaps, Registry
from maskd_core.spec import JobSpec, ModelSpec, TaskName

ModelBuilder = Callable[[Any, int], nn.Module]
"""``builder(args, num_classes) -> nn.Module`` where ``args`` is the entry's argument model."""

MODELS: Registry[ModelBuilder] = Registry("model")


def build_model(spec: ModelSpec, num_classes: int, field: str = "model") -> nn.Module:
    """Build ``spec.arch`` with its arguments and load ``spec.weights`` when given."""
    args = MODELS.parse_args(spec.arch, spec.args, field=f"{field}.args")
    model = MODELS.get(spec.arch, field=f"{field}.arch")(args, num_classes)
    if spec.weights is not None:
        load_weights(model, spec.weights, field=f"{field}.weights")
    return model


def default_taps(arch: str, where: str) -> DefaultTaps:
    """The default taps of registered model ``arch`` (the ``where`` of the spec: teacher or
    student)."""
    taps = MODELS.entry(arch, field=f"{where}.arch").taps
    if taps is None:
        raise SpecError(
            f"model {arch!r} has no default taps; list the modules to distil in {where}.layers",
            field=f"{where}.layers",
        )
    return taps


def with_default_layers(spec: JobSpec) -> JobSpec:
    """``spec`` with every model's ``layers`` left out replaced by its registry defaults.

    The one place a spec's layers are resolved: whatever taps a model (the stages, the mask
    grids, token reuse, the tokens' tags) reads the result, so all of them tap the same modules.
    The spec module cannot do it itself, as the registry needs torch. A weights file changes
    nothing here: a state dict of a registry architecture has that architecture's modules.
    """
    updates: dict[str, ModelSpec] = {}
    for where, model in (("teacher", spec.teacher), ("student", spec.student)):
        if model is not None and model.layers is None:
            layers = list(default_taps(model.arch, where).layers)
            updates[where] = model.model_copy(update={"layers": layers})
    return spec.model_copy(update=updates) if updates else spec


def read_state_dict(path: str | Path, field: str = "weights") -> dict[str, torch.Tensor]:
    """Read a state dict file without unpickling code; refuse anything else."""
    file = Path(path)
    try:
        exists = file.is_file()
    except (OSError, ValueError):  # a name too long, a NUL: no such file either
        exists = False
    if not exists:
        raise SpecError(
            f"weights file {str(file)!r} does not exist; give the path of a state dict saved "
            "with torch.save(model.state_dict(), path)",
            field=field,
        )
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SpecError(
            f"weights file {str(file)!r} is not a loadable state dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); save weights with torch.save(model.state_dict(), "
            "path), not the pickled module",
            field=field,
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise SpecError(
            f"weights file {str(file)!r} does not hold a state dict (a mapping of parameter "
            "names to tensors); save it with torch.save(model.state_dict(), path)",
            field=field,
        )
    return obj


def load_weights(model: nn.Module, path: str | Path, field: str = "weights") -> None:
    """Load a state dict into ``model``, naming missing/unexpected keys when they differ."""
    state = read_state_dict(path, field)
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    if missing or unexpected:
        raise SpecError(
            f"weights file {str(path)!r} does not match the architecture: "
            f"{len(missing)} missing keys ({', '.join(missing[:5])}), "
            f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:5])}); check arch and args",
            field=field,
        )
    # Checked before loading: load_state_dict reports a size mismatch as a bare RuntimeError.
    shape_errors = [
        f"{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in state.items()
        if own[key].shape != value.shape
    ]
    if shape_errors:
        raise SpecError(
            f"weights file {str(path)!r} has tensors of the wrong shape: "
            + "; ".join(shape_errors[:5]),
            field=field,
        )
    model.load_state_dict(state)


MODEL_SPEC_FORMAT = "maskd-model-spec/1"


def model_document(spec: ModelSpec, num_classes: int, task: TaskName) -> dict[str, Any]:
    """What rebuilds a trained network by name (``model_spec.json`` beside its weights).

    The weights path is left out: the document travels with the weights (into MLflow, say) and
    the path would name a file on the machine that trained them.
    """
    return {
        "format": MODEL_SPEC_FORMAT,
        "model": spec.model_dump(mode="json", exclude={"weights"}),
        "num_classes": num_classes,
        "task": task,
    }


def build_from_document(document: Mapping[str, Any], weights: str | Path) -> nn.Module:
    """The network ``model_document`` describes, with ``weights`` loaded, in eval mode."""
    if document.get("format") != MODEL_SPEC_FORMAT:
        raise ValueError(f"a model document must have format {MODEL_SPEC_FORMAT!r}")
    spec = ModelSpec.model_validate(document["model"])
    model = build_model(spec.model_copy(update={"weights": None}), int(document["num_classes"]))
    load_weights(model, weights)
    return model.eval()


from maskd_core.models import detection as _detection  # noqa: E402,F401  (registers)
from maskd_core.models import segmentation as _segmentation  # noqa: E402,F401  (registers)
