"""bitsandbytes 8-bit bases (Linear8bitLt): identity, forward and plain autograd for every variant.

The 4-bit (Linear4bit, nf4) base is a full subject of the contract suite (test_contract.py). On CPU the
8-bit layer computes x (SCB ⊙ CB / 127)ᵀ, so a float model holding the dequantized weights is a tight
reference for the adapted outputs and gradients. bnb's 8-bit autograd.Function has no `setup_context`,
yet `torch.func.grad` runs too: `apply` routes bnb layers through `QuantizedLinear` under transforms.
"""

from __future__ import annotations

import pytest
import torch
from components import tiny_config
from conftest import (
    NOT_IDENTITY_AT_INIT,
    assert_untouched,
    perturbed,
    qwen3_batch,
    snapshot,
    tiny_qwen3,
    tiny_qwen3_8bit,
)
from test_contract import _only

import lora_func as lf
from lora_func._variant import Intervention
from lora_func.kinds.linear import dense_weight
from lora_func.variants import REGISTRY

VARIANTS = sorted(REGISTRY)


def make(name, model, batch):
    kwargs = {"calibration_data": [batch]} if REGISTRY[name].calibrated else {}
    return lf.init(model, tiny_config(name, r=4), seed=0, **kwargs)


@pytest.mark.parametrize("name", VARIANTS)
def test_8bit_identity_gradients_and_untouched(name):
    model = tiny_qwen3_8bit()
    batch = qwen3_batch()
    with torch.no_grad():
        base = model(**batch).logits
    before = snapshot(model)
    params = make(name, model, batch)
    if name not in NOT_IDENTITY_AT_INIT:
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


def dequantized_twin(quantized):
    """A float tiny Qwen3 holding the 8-bit model's dequantized weights."""
    plain = tiny_qwen3()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if type(module).__name__ == "Linear8bitLt":
                plain.get_submodule(name).weight.copy_(dense_weight(module))
    return plain


def copied(params):
    """The same leaf values in new tensors, with the same trainable flags."""
    return params.replace(
        {p: {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in e.items()} for p, e in params.items()}
    )


@pytest.mark.parametrize("name", VARIANTS)
def test_8bit_matches_the_dequantized_float_model(name):
    """Off its init, each adapted 8-bit layer equals its merged dense weight, and outputs and gradients (autograd
    and torch.func) equal those of the same adapter on a float model holding the dequantized weights."""
    if "linear" not in REGISTRY[name].kinds:
        pytest.skip(f"{name} adapts no linear layer, so no 8-bit layer")
    model = tiny_qwen3_8bit()
    batch = qwen3_batch()
    intervention = REGISTRY[name].capability(Intervention) is not None  # a block's output: no layer, no merge
    modules = {"Qwen3DecoderLayer"} if intervention else {"Linear8bitLt"}
    assert {t.module for t in lf.targets(model, tiny_config(name, r=4))} == modules
    params = perturbed(make(name, model, batch))
    before = snapshot(model)
    merged = {} if intervention else lf.merge(model, params)
    with torch.no_grad():
        for target in params.targets if not intervention else ():
            x = torch.randn(3, target.d_in, generator=torch.Generator().manual_seed(0))
            layer = model.get_submodule(target.path)
            dense = torch.nn.functional.linear(x, merged[f"{target.path}.weight"], layer.bias)
            torch.testing.assert_close(lf.apply(layer, _only(params, target), x), dense, rtol=1e-4, atol=1e-4)

    twin_params = copied(params)
    out = lf.apply(model, params, batch)
    out.loss.backward()
    assert_untouched(model, before)
    reference = lf.apply(dequantized_twin(model), twin_params, batch)
    torch.testing.assert_close(out.logits, reference.logits, rtol=1e-4, atol=1e-5)
    reference.loss.backward()
    for path, leaf, tensor in lf.split(params)[0].leaves():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, f"{path}.{leaf}"
        expected = twin_params[path][leaf].grad
        torch.testing.assert_close(tensor.grad, expected, rtol=1e-4, atol=1e-6, msg=f"{path}.{leaf}")

    trainable, frozen = lf.split(params)
    func = torch.func.grad(lambda t: lf.apply(model, lf.combine(t, frozen), batch).loss)(trainable)
    for path, leaf, tensor in trainable.leaves():
        torch.testing.assert_close(func[path][leaf], tensor.grad, rtol=1e-5, atol=1e-6, msg=f"{path}.{leaf}")
    assert_untouched(model, before)
