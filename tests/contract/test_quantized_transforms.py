"""torch.func on an 8-bit base: bnb's `MatMul8bitLt` has no `setup_context`, so `apply` routes bnb layers
through `QuantizedLinear` under transforms. Its results must equal plain autograd through bnb's own path.

Tolerance: both paths run the same int8 forward (bnb's kernel, row-wise int8 quantization of the input,
so folding vmap's K adapters into the rows quantizes each row as before) and the same backward,
grad @ (CB * SCB / 127). They differ only in fp32 summation order, so fp32 tolerances apply, not int8's.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_untouched, perturbed, qwen3_batch, snapshot, tiny_qwen3_8bit

import lora_func as lf

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented")


def test_func_grad_on_8bit_base_equals_autograd():
    model = tiny_qwen3_8bit()
    batch = qwen3_batch()
    params = perturbed(lf.init(model, lf.LoRAConfig(r=4), seed=0), seed=1)
    before = snapshot(model)
    loss = lf.apply(model, params, batch).loss
    loss.backward()
    func, func_loss = torch.func.grad_and_value(lambda p: lf.apply(model, p, batch).loss)(params)
    assert_untouched(model, before)  # no base gradient, int8 weights and scales unchanged
    torch.testing.assert_close(func_loss, loss.detach(), rtol=1e-6, atol=1e-6)
    for path, leaf, t in params.leaves():
        assert t.grad.abs().sum() > 0
        torch.testing.assert_close(func[path][leaf], t.grad, rtol=1e-5, atol=1e-6, msg=f"{path}.{leaf}")


def test_vmap_and_vmap_grad_on_8bit_base_equal_separate_runs():
    model = tiny_qwen3_8bit()
    batch = qwen3_batch()
    adapters = [perturbed(lf.init(model, lf.LoRAConfig(r=4), seed=s), seed=10 + s) for s in range(3)]
    stacked = lf.stack(adapters)
    before = snapshot(model)
    logits = torch.func.vmap(lambda p: lf.apply(model, p, batch).logits)(stacked)
    grads = torch.func.vmap(torch.func.grad(lambda p: lf.apply(model, p, batch).loss))(stacked)
    assert_untouched(model, before)
    for k, p in enumerate(adapters):
        out = lf.apply(model, p, batch)
        torch.testing.assert_close(logits[k], out.logits.detach(), rtol=1e-5, atol=1e-5)
        out.loss.backward()
        for path, leaf, t in p.leaves():
            torch.testing.assert_close(grads[path][leaf][k], t.grad, rtol=1e-5, atol=1e-6, msg=f"{k} {path}.{leaf}")
    assert_untouched(model, before)


def test_8bit_without_routing_fails_under_func_grad():
    """Why the routing exists: bnb's own autograd.Function refuses torch.func (if bnb ever fixes this,
    this test fails and the routing can go)."""
    model = tiny_qwen3_8bit()
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    x = torch.randn(2, layer.in_features)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda x: layer(x).sum())(x)
