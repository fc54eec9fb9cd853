"""HRA against the dense product of Householder reflections and against PEFT's HRA."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft_parity import (
    ALL_PROJECTIONS,
    PROJECTIONS,
    assert_same_as_peft,
    copy_into_peft,
    dequantized_twins,
    randomized,
    twins,
)
from torch import nn

import lora_func as lf


def dense_reflections(u: torch.Tensor) -> torch.Tensor:
    """R = H_0 H_1 ⋯ H_{r-1}, H_i = I − 2 û_i û_iᵀ, built densely in float64."""
    u = u.double()
    R = torch.eye(u.shape[0], dtype=torch.float64)
    for i in range(u.shape[1]):
        v = u[:, i : i + 1] / u[:, i].norm()
        R = R @ (torch.eye(u.shape[0], dtype=torch.float64) - 2 * v @ v.t())
    return R


def draw(path, leaf, value, gen):
    return value + 0.3 * torch.randn(value.shape, generator=gen)


def layer_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10))


@pytest.mark.parametrize("r", [2, 6])
def test_dense_reference_and_merge(r):
    model = layer_model()
    params = randomized(lf.init(model, lf.HRAConfig(r=r), seed=0), draw)
    layer = model[0]
    R = dense_reflections(params["0"]["u"].detach())
    torch.testing.assert_close(R @ R.t(), torch.eye(12, dtype=torch.float64))  # orthogonal
    W, b = (layer.weight.detach().double() @ R).float(), layer.bias.detach()
    x = torch.randn(4, 7, 12)
    with torch.no_grad():
        torch.testing.assert_close(lf.apply(model, params, x), x @ W.t() + b, rtol=1e-5, atol=1e-6)
        merged = lf.merge(model, params)
    torch.testing.assert_close(merged["0.weight"], W, rtol=1e-5, atol=1e-6)
    assert "0.bias" not in merged
    # An orthogonal R keeps every row norm of W.
    torch.testing.assert_close(merged["0.weight"].norm(dim=1), layer.weight.detach().norm(dim=1))


def test_init_pairs_reflections_and_is_bitwise_identity():
    model = layer_model()
    params = lf.init(model, lf.HRAConfig(r=4), seed=0)
    u = params["0"]["u"]
    assert torch.equal(u[:, 0::2], u[:, 1::2]) and torch.equal(u, params["0"]["u0"])
    torch.testing.assert_close(dense_reflections(u), torch.eye(12, dtype=torch.float64))
    x = torch.randn(3, 12)
    with torch.no_grad():
        assert torch.equal(lf.apply(model, params, x), model(x))


def test_bad_rank_names_the_field():
    with pytest.raises(ValueError, match="`r` must be even"):
        lf.HRAConfig(r=3)
    with pytest.raises(ValueError, match=r"`r`=14 exceeds d_in=12 of '0'"):
        lf.init(layer_model(), lf.HRAConfig(r=14))
    with pytest.raises(ValueError, match=r"`r`=14 exceeds d_in=12"):
        lf.targets(layer_model(), lf.HRAConfig(r=14))
    with pytest.raises(ValueError, match=r"`rank_pattern` value for 'q_proj' must be even, got 3"):
        lf.HRAConfig(r=4, rank_pattern={"q_proj": 3})


def _peft_hra(peft_layer, leaf):
    return peft_layer.hra_u["default"]


@pytest.mark.parametrize("bits", [None, 4])
def test_matches_peft(bits):
    """PEFT's HRA has no bitsandbytes layer: the 4-bit case compares against PEFT on the dequantized weights."""
    from peft import HRAConfig, get_peft_model

    model, twin = dequantized_twins() if bits else twins(attention_bias=True)
    params = randomized(lf.init(model, lf.HRAConfig(r=4, target_names=ALL_PROJECTIONS), seed=0), draw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(twin, HRAConfig(r=4, target_modules=list(PROJECTIONS)))
    assert len(params.targets) == sum(hasattr(m, "hra_u") for m in peft_model.modules()) == 14
    copy_into_peft(peft_model, params, _peft_hra)
    assert_same_as_peft(model, params, peft_model, _peft_hra)
