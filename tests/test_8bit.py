"""SSVD, EVA, AntiPaSTO and ROAD on bitsandbytes 8-bit bases: forward and plain autograd.

Complements test_quantized.py (identity and some gradient, for every variant) with what these four
promise there: an exact identity at init, an output that moves once leaves move, a nonzero gradient
on every trainable leaf, and an untouched base. torch.func does not run through Linear8bitLt.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_untouched, qwen3_batch, snapshot, tiny_qwen3_8bit

import lora_func as lf
from lora_func.variants import REGISTRY


@pytest.mark.parametrize("name", ["ssvd", "eva", "antipasto", "road"])
def test_runs_on_8bit_base(name):
    model = tiny_qwen3_8bit()
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    batch = qwen3_batch()
    variant = REGISTRY[name]
    kw = {"calibration_data": [batch], "progress": False} if variant.calibrated else {}
    before = snapshot(model)
    params = lf.init(model, variant.config(r=4), **kw)
    with torch.no_grad():
        base = model(**batch).logits
        assert torch.equal(lf.apply(model, params, batch).logits, base)
    assert_untouched(model, before)

    gen = torch.Generator().manual_seed(0)
    trainable, frozen = lf.split(params)
    moved = {
        p: {k: (v.detach() + 0.05 * torch.randn(v.shape, generator=gen)).requires_grad_() for k, v in e.items()}
        for p, e in trainable.items()
    }
    params = lf.combine(trainable.replace(moved), frozen)
    out = lf.apply(model, params, batch)
    assert not torch.allclose(out.logits, base, atol=1e-3)
    out.loss.backward()
    assert_untouched(model, before)
    dead = [(p, k) for p, k, t in lf.split(params)[0].leaves() if t.grad is None or not t.grad.abs().sum() > 0]
    assert not dead, dead[:5]
