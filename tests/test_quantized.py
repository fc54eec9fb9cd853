"""bitsandbytes 8-bit bases (Linear8bitLt): identity, forward and plain autograd for every variant.

The 4-bit (Linear4bit, nf4) base is a full subject of the contract suite (test_contract.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_untouched, qwen3_batch, snapshot, tiny_qwen3_8bit

import lora_func as lf
from lora_func._base import dense_weight
from lora_func.variants import REGISTRY

VARIANTS = sorted(REGISTRY)


def make(name, model, batch):
    kwargs = {"calibration_data": [batch]} if REGISTRY[name].calibrated else {}
    return lf.init(model, REGISTRY[name].config(r=4), seed=0, **kwargs)


@pytest.mark.parametrize("name", VARIANTS)
def test_8bit_identity_gradients_and_untouched(name):
    model = tiny_qwen3_8bit()
    batch = qwen3_batch()
    with torch.no_grad():
        base = model(**batch).logits
    before = snapshot(model)
    params = make(name, model, batch)
    with torch.no_grad():
        torch.testing.assert_close(lf.apply(model, params, batch).logits, base, rtol=0, atol=1e-6)
    lf.apply(model, params, batch).loss.backward()
    assert_untouched(model, before)
    grads = [t.grad for _, _, t in lf.split(params)[0].leaves()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_8bit_dense_weight_is_the_int8_weight_times_its_scale():
    model = tiny_qwen3_8bit()
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        model(**qwen3_batch())  # bnb moves CB/SCB from the weight to `layer.state` on its first forward
    dense = dense_weight(layer)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        layer.train()
        torch.testing.assert_close(layer(x), x @ dense.T, rtol=1e-5, atol=1e-5)  # Qwen3 projections: no bias
