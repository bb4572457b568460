"""Forward hooks on named modules: read, or replace, what a layer outputs.

MasKD works on whatever modules a job names (a backbone stage, an FPN, the logits), so the
stages never need a model to expose features itself. A tapped module's output is seen as a list
of *levels*: a tensor is one level, a tuple/list one level per element and a dict one level per
value in insertion order (an FPN). Stage 1 replaces each level by its masked version and the hook
rebuilds the original structure, so the model's own head consumes the masked features unchanged.

Names are resolved against ``model.named_modules()`` when a ``Taps`` is created, so a typo is a
``UnknownNameError`` before any training, with the close matches in its message.

A module a head shares across the FPN levels runs once per level in one forward (RetinaNet's
box-regression conv, say): tapped with ``per_call``, each of its calls adds its levels, so the
head's outputs come out one level per call, in the order the head ran them.

A forward that may stop early (a detector's teacher forward skips the head, which costs more
than the backbone) asks ``reads_within`` whether an open ``Taps`` hooks a module of the part it
would skip, and runs it when one does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from maskd_core.errors import UnknownNameError

_open_taps: WeakKeyDictionary[nn.Module, int] = WeakKeyDictionary()
"""How many open ``Taps`` hook each module (weakly: a dropped model leaves nothing behind)."""


def reads_within(module: nn.Module) -> bool:
    """Whether an open ``Taps`` hooks ``module`` or one of its submodules."""
    return any(_open_taps.get(part, 0) > 0 for part in module.modules())


Replace = Callable[[int, int, torch.Tensor], torch.Tensor]
"""``replace(layer_index, level_index, tensor) -> tensor`` for the level of a tapped layer."""


def resolve_modules(
    model: nn.Module, names: Sequence[str], field: str = "layers"
) -> list[nn.Module]:
    """The modules called ``names`` in ``model``; ``field`` names the spec list in errors."""
    modules = dict(model.named_modules())
    modules.pop("", None)  # the root has no name a user could write
    resolved = []
    for index, name in enumerate(names):
        if name not in modules:
            raise UnknownNameError("layer", name, modules, field=f"{field}[{index}]")
        resolved.append(modules[name])
    return resolved


def flatten_levels(output: Any) -> list[torch.Tensor]:
    """The tensors of a module output in level order (see the module docstring)."""
    if isinstance(output, torch.Tensor):
        return [output]
    values = list(output.values()) if isinstance(output, Mapping) else output
    if (
        isinstance(values, list | tuple)
        and values
        and all(isinstance(v, torch.Tensor) for v in values)
    ):
        return list(values)
    raise TypeError(
        f"a tapped module must return a tensor, or a non-empty tuple, list or dict of tensors; "
        f"got {type(output).__name__}"
    )


def rebuild_levels(output: Any, levels: Sequence[torch.Tensor]) -> Any:
    """``output`` with its tensors replaced by ``levels``, keeping its type and dict keys."""
    if isinstance(output, torch.Tensor):
        return levels[0]
    container: Any = type(output)
    if isinstance(output, Mapping):
        return container(zip(output.keys(), levels, strict=True))
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # namedtuple
        return container(*levels)
    return container(levels)


class Taps:
    """Hooks on the named modules of ``model`` while used as a context manager.

    Inside the ``with`` block every forward records each tapped layer's levels (``levels``); with
    ``replace`` the module's output is swapped for ``replace(layer, level, tensor)`` of each
    level. Leaving the block removes the hooks, so a model is never left modified.

    A module called several times keeps its latest call's levels, unless ``per_call``: then
    every call appends its levels (numbered on from the earlier calls' for ``replace``) until
    ``clear``, which the caller runs before each forward.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        replace: Replace | None = None,
        field: str = "layers",
        *,
        per_call: bool = False,
    ) -> None:
        self.names = list(names)
        self.modules = resolve_modules(model, self.names, field)
        self.replace = replace
        self.per_call = per_call
        self._captured: list[list[torch.Tensor] | None] = [None] * len(self.modules)
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> Taps:
        for index, module in enumerate(self.modules):
            self._handles.append(module.register_forward_hook(self._hook(index)))
            _open_taps[module] = _open_taps.get(module, 0) + 1
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._handles:
            for module in self.modules:
                _open_taps[module] -= 1
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def _hook(self, layer: int) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            levels = flatten_levels(output)
            earlier = self._captured[layer] if self.per_call else None
            first = 0 if earlier is None else len(earlier)
            self._captured[layer] = levels if earlier is None else [*earlier, *levels]
            if self.replace is None:
                return None
            replaced = [self.replace(layer, first + j, level) for j, level in enumerate(levels)]
            return rebuild_levels(output, replaced)

        return hook

    def layer_levels(self, layer: int) -> list[torch.Tensor]:
        """The levels tapped layer ``layer`` output in the latest forward (before replacement);
        with ``per_call``, those of every call since ``clear``."""
        captured = self._captured[layer]
        if captured is None:
            raise RuntimeError(
                f"layer {self.names[layer]!r} did not run in the forward pass; tap a module the "
                "model calls"
            )
        return captured

    def levels(self) -> list[torch.Tensor]:
        """All levels of all tapped layers, layer by layer, from the latest forward."""
        return [level for layer in range(len(self.modules)) for level in self.layer_levels(layer)]

    def clear(self) -> None:
        """Drop the captured tensors (and the graph they hold) before the next step."""
        self._captured = [None] * len(self.modules)
