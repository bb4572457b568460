from __future__ import annotations

import pytest
import torch
from maskd_core_toys import ToyFPNNet, ToyNet
from torch import nn

from maskd_core.errors import UnknownNameError
from maskd_core.taps import Taps, flatten_levels, rebuild_levels


def test_capture_tensor_output_matches_module_output() -> None:
    model = ToyNet(4).eval()
    x = torch.rand(2, 3, 16, 16)
    with Taps(model, ["body", "head"]) as taps:
        logits = model(x)
        body = taps.layer_levels(0)[0]
        assert torch.equal(taps.layer_levels(1)[0], logits)
        assert [t.shape[1] for t in taps.levels()] == [4, 3]
    assert torch.equal(body, model.body(model.stem(x)))


@pytest.mark.parametrize("as_dict", [False, True])
def test_tuple_and_dict_outputs_are_levels_and_replacement_keeps_structure(as_dict: bool) -> None:
    model = ToyFPNNet(4, as_dict=as_dict).eval()
    x = torch.rand(1, 3, 16, 16)
    seen: list[tuple[int, int]] = []
    outputs = []

    def double(layer: int, level: int, feature: torch.Tensor) -> torch.Tensor:
        seen.append((layer, level))
        return feature * 2

    model.neck.register_forward_hook(lambda m, i, o: outputs.append(o))
    reference = model(x)
    with Taps(model, ["neck"], replace=double) as taps:
        doubled = model(x)
        assert [lv.shape[-1] for lv in taps.levels()] == [16, 8]
    assert seen == [(0, 0), (0, 1)]
    assert isinstance(outputs[-1], dict if as_dict else tuple)
    if as_dict:
        assert list(outputs[-1]) == ["p1", "p2"]
    bias = model.head.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(doubled - bias, 2 * (reference - bias))


def test_hooks_are_removed_on_exit_even_after_an_error() -> None:
    model = ToyNet(4)
    with pytest.raises(ZeroDivisionError), Taps(model, ["body"], replace=lambda *a: 1 / 0):
        model(torch.rand(1, 3, 8, 8))
    assert all(not m._forward_hooks for m in model.modules())
    with Taps(model, ["body", "stem.0"]) as taps:
        assert len(model.body._forward_hooks) == 1
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="did not run"):
        taps.layer_levels(0)


def test_unknown_layer_names_close_matches_and_field() -> None:
    with pytest.raises(UnknownNameError) as err:
        Taps(ToyNet(4), ["body", "haed"], field="teacher.layers")
    assert err.value.field == "teacher.layers[1]"
    assert "'head'" in str(err.value)
    assert err.value.close_matches[0] == "head"


def test_flatten_and_rebuild_roundtrip_and_refuse_non_tensors() -> None:
    a, b = torch.zeros(1), torch.ones(1)
    assert rebuild_levels([a, b], flatten_levels([b, a])) == [b, a]
    with pytest.raises(TypeError, match="tapped module"):
        flatten_levels(("x", a))
    with pytest.raises(TypeError):
        flatten_levels(nn.Identity())
