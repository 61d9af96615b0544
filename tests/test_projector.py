"""Projector types and their transformers-compatible submodule names."""

from __future__ import annotations

import pytest
import torch

from llava_lite.model.projector import Projector


def test_linear_projector_is_one_layer():
    projector = Projector("linear", 8, 16)
    assert [name for name, _ in projector.named_children()] == ["linear_1"]
    assert projector(torch.randn(2, 3, 8)).shape == (2, 3, 16)


def test_mlp2x_gelu_is_named_like_transformers_llava():
    projector = Projector("mlp2x_gelu", 8, 16)
    assert sorted(projector.state_dict()) == ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]
    assert isinstance(projector.act, torch.nn.GELU)
    x = torch.randn(4, 8)
    assert torch.allclose(projector(x), projector.linear_2(torch.nn.functional.gelu(projector.linear_1(x))))


def test_mlp3x_gelu_has_three_layers():
    projector = Projector("mlp3x_gelu", 8, 16)
    assert {n.split(".")[0] for n in projector.state_dict()} == {"linear_1", "linear_2", "linear_3"}


@pytest.mark.parametrize("name", ["mlp", "mlp0x_gelu", "conv", "mlp2x_relu"])
def test_unknown_projector_type_is_refused(name):
    with pytest.raises(ValueError, match="unknown projector type"):
        Projector(name, 8, 16)
