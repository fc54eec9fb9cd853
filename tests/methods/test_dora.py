"""DoRA against its dense formula and against PEFT's `LoraConfig(use_dora=True)`."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft_parity import ALL_PROJECTIONS, PROJECTIONS, assert_same_as_peft, copy_into_peft, randomized, twins
from torch import nn

import lora_func as lf
from lora_func.kinds import site_for
from lora_func.variants import dora


def dense_dora(W, b, A, B, m, s):
    """The paper's W' = m ⊙ (W + s B A) / ‖W + s B A‖_row, with the bias left as it is (PEFT)."""
    V = W + s * B @ A
    return m[:, None] * V / V.norm(dim=1, keepdim=True), b


def layer_model(d_in=12, d_out=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, d_out))


def draw(path, leaf, value, gen):
    if leaf == "magnitude":
        return value * (1 + 0.2 * torch.randn(value.shape, generator=gen, dtype=value.dtype))
    return value + 0.3 * torch.randn(value.shape, generator=gen, dtype=value.dtype)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_dense_reference_and_merge(use_rslora):
    model = layer_model()
    cfg = lf.DoRAConfig(r=3, alpha=5, use_rslora=use_rslora)
    params = randomized(lf.init(model, cfg, seed=0), draw)
    leaves, layer = params["0"], model[0]
    s = 5 / 3**0.5 if use_rslora else 5 / 3
    W, b = dense_dora(layer.weight.detach(), layer.bias.detach(), leaves["A"], leaves["B"], leaves["magnitude"], s)
    x = torch.randn(4, 7, 12)
    with torch.no_grad():
        torch.testing.assert_close(lf.apply(model, params, x), x @ W.t() + b, rtol=1e-5, atol=1e-6)
        merged = lf.merge(model, params)
    torch.testing.assert_close(merged["0.weight"], W, rtol=1e-5, atol=1e-6)
    assert "0.bias" not in merged  # DoRA leaves the bias as it is


def test_rank_and_alpha_patterns_resolve_per_target():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 8))
    cfg = lf.DoRAConfig(r=3, alpha=6, rank_pattern={"1": 2}, alpha_pattern={"1": 1.0})
    params = randomized(lf.init(model, cfg, seed=0), draw)
    assert params["0"]["A"].shape == (3, 12) and params["1"]["A"].shape == (2, 10)
    merged = lf.merge(model, params)
    for i, s in ((0, 6 / 3), (1, 1.0 / 2)):
        leaves, layer = params[str(i)], model[i]
        W, _ = dense_dora(layer.weight.detach(), None, leaves["A"], leaves["B"], leaves["magnitude"], s)
        torch.testing.assert_close(merged[f"{i}.weight"], W, rtol=1e-5, atol=1e-6)
    x = torch.randn(5, 12)
    with torch.no_grad():
        expected = torch.func.functional_call(model, merged, (x,))
        torch.testing.assert_close(lf.apply(model, params, x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quantized", [False, True])
def test_row_norm_needs_no_dense_product(quantized):
    """The norm from ‖W_i‖² (frozen), the base layer run on A's rows, and A Aᵀ equals the dense norm."""
    from conftest import tiny_qwen3, tiny_qwen3_4bit

    model = tiny_qwen3_4bit() if quantized else tiny_qwen3(attention_bias=True)
    cfg = lf.DoRAConfig(r=4, alpha=8, target_names=ALL_PROJECTIONS)
    params = randomized(lf.init(model, cfg, seed=0), draw)
    for target in params.targets:
        layer = model.get_submodule(target.path)
        leaves = params[target.path]
        W = lf.kinds.linear.dense_weight(layer)
        dense = (W + 2 * leaves["B"].detach() @ leaves["A"].detach()).norm(dim=1)
        got = dora.row_norm(leaves, site_for(model, target, cfg, "test"), torch.float32)
        assert not got.requires_grad
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-6, msg=target.path)
        assert torch.equal(leaves["weight_sq_norm"], W.square().sum(dim=1))


def test_identity_at_init_is_exact_with_bias():
    model = layer_model()
    params = lf.init(model, lf.DoRAConfig(r=4), seed=0)
    assert torch.equal(params["0"]["magnitude"], params["0"]["weight_sq_norm"].sqrt())
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert torch.equal(lf.apply(model, params, x), model(x))


def _peft_dora(peft_layer, leaf):
    return {
        "A": peft_layer.lora_A["default"].weight,
        "B": peft_layer.lora_B["default"].weight,
        "magnitude": peft_layer.lora_magnitude_vector["default"].weight,
    }[leaf]


@pytest.mark.parametrize(
    "setting", [dict(attention_bias=True), dict(attention_bias=True, use_rslora=True), dict(bits=4)]
)
def test_matches_peft(setting):
    from peft import LoraConfig, get_peft_model

    use_rslora = setting.pop("use_rslora", False)
    model, twin = twins(**setting)
    cfg = lf.DoRAConfig(r=4, alpha=8, use_rslora=use_rslora, target_names=ALL_PROJECTIONS)
    params = randomized(lf.init(model, cfg, seed=0), draw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            twin, LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora, target_modules=list(PROJECTIONS), use_dora=True)
        )
    assert {t.path for t in params.targets} == {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
    }
    copy_into_peft(peft_model, params, _peft_dora)
    assert_same_as_peft(model, params, peft_model, _peft_dora)
