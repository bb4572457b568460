"""What a model's tapped layers output for an input: found by one forward, remembered by key.

Validation needs each distilled level's (C, H, W), which only a forward of the built model
shows. Building and running a model costs tens of milliseconds for the tiny ones and seconds for
a detector, yet the answer is deterministic: the same architecture, arguments, weights file,
class count, layers and input shape give the same shapes. So ``probed_level_shapes`` keeps
them per process, keyed by exactly those, and a service validating many submissions of a known
teacher/student pairing builds each model once. A weights file is keyed by its resolved path,
size and modification time, so a replaced file is probed (and its state dict checked) again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from maskd_core.errors import SpecError
from maskd_core.models import build_model
from maskd_core.plan import Shape
from maskd_core.spec import ModelSpec
from maskd_core.taps import Taps
from maskd_core.tasks import Task

PROBE_CACHE_SIZE = 256
_probed: dict[tuple[Any, ...], list[list[Shape]]] = {}


def level_shapes(
    task: Task, model: nn.Module, batch: Any, layers: list[str], field: str
) -> list[list[Shape]]:
    """Per tapped layer, the (C, H, W) of each level in one no-grad eval forward."""
    model.eval()
    with Taps(model, layers, field=field) as taps, torch.no_grad():
        try:
            task.forward(model, batch)
        except TypeError as exc:  # a tapped output that is not tensors
            raise SpecError(str(exc), field=field) from None
        except RuntimeError as exc:
            raise SpecError(
                f"the model failed on a sample of the dataset: {str(exc).splitlines()[0][:300]}; "
                "check the model's args and the dataset",
                field=field.rsplit(".", 1)[0],
            ) from None
        shapes = []
        for index in range(len(layers)):
            try:
                levels = taps.layer_levels(index)
            except RuntimeError as exc:
                raise SpecError(str(exc), field=f"{field}[{index}]") from None
            for level in levels:
                if level.dim() != 4:
                    raise SpecError(
                        f"layer {layers[index]!r} outputs a tensor of shape "
                        f"{tuple(level.shape)}; MasKD distils [N,C,H,W] feature maps, so tap a "
                        "convolutional layer",
                        field=f"{field}[{index}]",
                    )
            shapes.append([(lv.shape[1], lv.shape[2], lv.shape[3]) for lv in levels])
    return shapes


def probed_level_shapes(
    model: ModelSpec, where: str, task: Task, batch: Any, num_classes: int
) -> list[list[Shape]]:
    """``level_shapes`` of the model ``model`` describes (at ``where`` in the spec: teacher
    or student), built and run only when this process has not probed the same key before.

    Only successes are kept: a refused model is built again next time, so its error (which
    names the field) is always the current one.
    """
    key = (
        where,
        model.model_dump_json(),
        _file_identity(model.weights),
        num_classes,
        type(task).__name__,
        tuple(_tensor_shapes(batch)),
    )
    shapes = _probed.get(key)
    if shapes is None:
        built = build_model(model, num_classes, field=where)
        shapes = level_shapes(task, built, batch, model.tapped_layers, f"{where}.layers")
        if len(_probed) >= PROBE_CACHE_SIZE:
            _probed.clear()
        _probed[key] = shapes
    return shapes


def _file_identity(path: str | None) -> tuple[str, int, int] | None:
    """Resolved path, size and modification time; None for no file (or none readable, which
    building the model then reports)."""
    if path is None:
        return None
    try:
        stat = os.stat(path)
        return os.path.realpath(path), stat.st_size, stat.st_mtime_ns
    except (OSError, ValueError):
        return None


def _tensor_shapes(value: Any) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Dtype and shape of every tensor in a (nested) batch: what a forward's shapes depend on."""
    if isinstance(value, torch.Tensor):
        yield str(value.dtype), tuple(value.shape)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensor_shapes(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensor_shapes(item)
