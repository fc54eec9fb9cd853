"""IA3 (gain on the output) and IA3-FF (gain on the input) against their dense formulas and against PEFT."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft_parity import ALL_PROJECTIONS, PROJECTIONS, assert_same_as_peft, copy_into_peft, randomized, twins
from torch import nn

import lora_func as lf


def draw(path, leaf, value, gen):
    return value + 0.3 * torch.randn(value.shape, generator=gen)


def layer_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10))


def test_ia3_dense_reference_and_merge():
    model = layer_model()
    params = randomized(lf.init(model, lf.IA3Config()), draw)
    gain, layer = params["0"]["l"].detach(), model[0]
    W, b = gain[:, None] * layer.weight.detach(), gain * layer.bias.detach()  # diag(l) W, l ⊙ b
    x = torch.randn(4, 7, 12)
    with torch.no_grad():
        torch.testing.assert_close(lf.apply(model, params, x), x @ W.t() + b, rtol=1e-6, atol=1e-6)
        merged = lf.merge(model, params)
    torch.testing.assert_close(merged["0.weight"], W, rtol=0, atol=1e-7)
    torch.testing.assert_close(merged["0.bias"], b, rtol=0, atol=1e-7)


def test_ia3ff_dense_reference_and_merge():
    model = layer_model()
    params = randomized(lf.init(model, lf.IA3FFConfig()), draw)
    gain, layer = params["0"]["l"].detach(), model[0]
    W, b = layer.weight.detach() * gain[None, :], layer.bias.detach()  # W diag(l), b
    x = torch.randn(4, 7, 12)
    with torch.no_grad():
        torch.testing.assert_close(lf.apply(model, params, x), x @ W.t() + b, rtol=1e-6, atol=1e-6)
        merged = lf.merge(model, params)
    torch.testing.assert_close(merged["0.weight"], W, rtol=0, atol=1e-7)
    assert "0.bias" not in merged


def test_shapes_follow_the_side_they_scale():
    model = layer_model()
    assert lf.init(model, lf.IA3Config())["0"]["l"].shape == (10,)
    assert lf.init(model, lf.IA3FFConfig())["0"]["l"].shape == (12,)


def _peft_ia3(peft_layer, leaf):
    return peft_layer.ia3_l["default"]


@pytest.mark.parametrize("feedforward", [False, True], ids=["ia3", "ia3ff"])
@pytest.mark.parametrize("bits", [None, 4])
def test_matches_peft(feedforward, bits):
    """PEFT's IA3 on the seven projections, all of them (IA3-FF) or none of them `feedforward_modules`."""
    from peft import IA3Config, get_peft_model

    model, twin = twins(bits=bits) if bits else twins(attention_bias=True)
    cfg_class = lf.IA3FFConfig if feedforward else lf.IA3Config
    params = randomized(lf.init(model, cfg_class(target_names=ALL_PROJECTIONS)), draw)
    peft_cfg = IA3Config(target_modules=list(PROJECTIONS), feedforward_modules=list(PROJECTIONS) if feedforward else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(twin, peft_cfg)
    assert len(params.targets) == sum(hasattr(m, "ia3_l") for m in peft_model.modules()) == 14
    copy_into_peft(peft_model, params, _peft_ia3)
    assert_same_as_peft(model, params, peft_model, _peft_ia3)
