"""ROAD against PEFT's implementation: same leaf values -> same outputs, gradients and merged weights."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import qwen3_batch, tiny_qwen3

import lora_func as lf

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_road(variant: str, group_size: int):
    from peft import RoadConfig, get_peft_model

    cfg = RoadConfig(variant=variant, group_size=group_size, target_modules=PROJECTIONS, init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(tiny_qwen3(), cfg)


def copied_from_peft(peft_model, params: lf.Params) -> lf.Params:
    """`params` with every leaf replaced by PEFT's (random, non-identity) road_theta / road_alpha."""
    entries = {}
    for target in params.targets:
        layer = peft_model.base_model.model.get_submodule(target.path)
        entries[target.path] = {
            "theta": layer.road_theta["default"].detach().clone().requires_grad_(),
            "alpha": layer.road_alpha["default"].detach().clone().requires_grad_(),
        }
    return params.replace(entries)


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_road_matches_peft_outputs_gradients_and_merge(variant):
    torch.manual_seed(0)
    peft_model = peft_road(variant, group_size=16)
    model = tiny_qwen3()
    cfg = lf.ROADConfig(variant=variant, group_size=16, target_names=tuple(f"{p}$" for p in PROJECTIONS))
    params = copied_from_peft(peft_model, lf.init(model, cfg))
    assert len(params.targets) == 14
    theta = params[params.targets[0].path]["theta"]
    assert theta.abs().max() > 0.1  # PEFT's init_weights=False: random angles, far from identity
    batch = qwen3_batch()

    expected = peft_model(**batch)
    got = lf.apply(model, params, batch)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got.logits, model(**batch).logits, atol=1e-2)  # the adapter does something

    expected.loss.backward()
    got.loss.backward()
    for target in params.targets:
        layer = peft_model.base_model.model.get_submodule(target.path)
        for leaf, name in (("theta", "road_theta"), ("alpha", "road_alpha")):
            ours, theirs = params[target.path][leaf].grad, getattr(layer, name)["default"].grad
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=f"{target.path}.{leaf}")

    merged = lf.merge(model, params)
    with torch.no_grad():
        peft_merged = peft_model.merge_and_unload()
    for target in params.targets:
        expected_weight = peft_merged.get_submodule(target.path).weight
        torch.testing.assert_close(merged[f"{target.path}.weight"], expected_weight, rtol=1e-5, atol=1e-6)


def test_road_rotates_the_bias_and_pairs_by_group():
    """On a layer with bias: y' = R (W x + b), R from the 2×2 blocks, against a dense R built by hand."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 8)
    model = torch.nn.Sequential(layer)
    params = lf.init(model, lf.ROADConfig(variant="road_2", group_size=4))
    theta, alpha = torch.randn(8), torch.rand(8) + 0.5
    params = params.replace({"0": {"theta": theta, "alpha": alpha}})
    R = torch.zeros(8, 8)
    for start in (0, 4):
        for i in range(2):  # element i pairs with i + 2 in each group of 4
            a, b = start + i, start + i + 2
            R[a, a], R[a, b] = alpha[a] * theta[a].cos(), -alpha[a] * theta[a].sin()
            R[b, b], R[b, a] = alpha[b] * theta[b].cos(), alpha[b] * theta[b].sin()
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = (layer(x)) @ R.T
        torch.testing.assert_close(lf.apply(model, params, x), expected, rtol=1e-5, atol=1e-6)
        merged = lf.merge(model, params)
    torch.testing.assert_close(merged["0.weight"], R @ layer.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged["0.bias"], R @ layer.bias.detach(), rtol=1e-5, atol=1e-6)


def test_road_group_size_default_and_errors():
    model = tiny_qwen3()
    params = lf.init(model, lf.ROADConfig(variant="road_1"))
    k_proj = next(t for t in params.targets if t.path.endswith("k_proj"))  # d_out 32: group 32
    assert params[k_proj.path]["theta"].shape == (16,)
    with pytest.raises(ValueError, match="`group_size`=64 does not fit"):
        lf.init(model, lf.ROADConfig(group_size=64))  # k_proj's 32 outputs are not a multiple of 64
    with pytest.raises(ValueError, match="`variant`"):
        lf.ROADConfig(variant="road_3")
    with pytest.raises(ValueError, match="`group_size`"):
        lf.ROADConfig(group_size=3)
    with pytest.raises(ValueError, match="`rank_pattern` must be empty"):
        lf.ROADConfig(rank_pattern={"q_proj": 2})
