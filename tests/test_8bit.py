"""Which variants run on bitsandbytes 8-bit bases (`Linear8bitLt`): forward and plain autograd (all of them).

bnb's 8-bit autograd.Function has no `setup_context`, so DESIGN.md asks only for forward and
`loss.backward()` here; `torch.func.grad` works as well, since `apply` routes bnb layers through
`QuantizedLinear` under transforms, and is checked against autograd. On CPU the 8-bit layer computes
x (SCB ⊙ CB / 127)ᵀ, so a float model holding the dequantized weights is a tight reference for outputs
and gradients.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_untouched, qwen3_batch, snapshot, tiny_qwen3, tiny_qwen3_8bit
from test_contract import _only, perturbed

import lora_func as lf
from lora_func._base import dense_weight
from lora_func.variants import REGISTRY

VARIANTS = sorted(REGISTRY)


def make_params(name, model):
    variant = REGISTRY[name]
    if variant.calibrated:
        return lf.init(model, variant.config(r=4), calibration_data=[qwen3_batch(seed=2)], seed=0, progress=False)
    return lf.init(model, variant.config(r=4), seed=0)


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
def test_forward_and_backward_on_8bit(name):
    model = tiny_qwen3_8bit()
    assert {t.kind for t in lf.targets(model, REGISTRY[name].config(r=4))} == {"Linear8bitLt"}
    batch = qwen3_batch()
    before = snapshot(model)
    with torch.no_grad():
        base = model(**batch).logits
    params = make_params(name, model)
    assert_untouched(model, before)
    with torch.no_grad():
        torch.testing.assert_close(lf.apply(model, params, batch).logits, base, rtol=0, atol=1e-6)

    # Perturbed: each adapted layer equals its merged dense weight, and the gradients equal those of the
    # same adapter on a float model that holds the dequantized weights.
    params = perturbed(params)
    merged = lf.merge(model, params)
    with torch.no_grad():
        for target in params.targets:
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
