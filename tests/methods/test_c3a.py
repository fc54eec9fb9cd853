"""C3A against its dense formula (block-circulant ΔW built by index, not by FFT) and against PEFT's C3A given the
same kernels: outputs, gradients, and files both ways.

PEFT's hand-written backward (`BlockCircularConvolution.backward`) gets the input gradient wrong (a float64
gradcheck fails; its kernel gradient is right), so a PEFT C3A layer with another C3A layer downstream receives a
wrong gradient. lora_func differentiates the same forward by autograd: its gradients are checked against the dense
formula everywhere, and against PEFT's where PEFT's are right (targets with no C3A layer downstream of them)."""

from __future__ import annotations

import pytest
import torch
from components import perturbed, qwen3_batch, tiny_qwen3
from peft_parity import assert_same_as_peft, copy_into_peft, peft_layer, randomized, twins

import lora_func as lf
from lora_func.variants.c3a import circular

peft = pytest.importorskip("peft")

LEAF = "c3a_kernel"


def _peft_leaf(layer, leaf):
    return getattr(layer, leaf)["default"]


def _draw(path, leaf, tensor, gen):
    return 0.5 * torch.randn(tensor.shape, generator=gen)


def circulant(w: torch.Tensor) -> torch.Tensor:
    """C(w) by index: block (i, j)[k, c] = w[i, j, (c − k) mod b]."""
    m, n, b = w.shape
    k, c = torch.arange(b)[:, None], torch.arange(b)[None, :]
    blocks = w[:, :, (c - k) % b]  # (m, n, b, b)
    return blocks.permute(0, 2, 1, 3).reshape(m * b, n * b)


def test_dense_formula_gradients_and_identity_at_init():
    model = tiny_qwen3().eval()
    params = lf.init(model, lf.C3AConfig(), seed=0)
    # the largest common divisor <= 256: 64 of 64 and 128, 32 of 64 and 32 (k_proj, v_proj)
    assert {t.path.rsplit(".", 1)[1]: params[t.path][LEAF].shape[-1] for t in params.targets} == {
        "q_proj": 64,
        "k_proj": 32,
        "v_proj": 32,
        "o_proj": 64,
        "gate_proj": 64,
        "up_proj": 64,
        "down_proj": 64,
    }
    batch = qwen3_batch()
    with torch.no_grad():
        assert torch.equal(lf.apply(model, params, batch).logits, model(**batch).logits)
    params = perturbed(lf.init(model, lf.C3AConfig(block_size=16), seed=0), scale=0.5)
    for key, dw in lf.delta_weights(model, params).items():
        w = params[key.removesuffix(".weight")][LEAF]
        torch.testing.assert_close(dw, circulant(w) / dw.shape[1], rtol=1e-5, atol=1e-6)
    # the gradients: those of the dense product (autograd through a matmul), in float64
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 64, dtype=torch.float64)
    got = torch.autograd.grad((circular(x, w) * g).sum(), (x, w))
    want = torch.autograd.grad((x @ circulant(w).t() * g).sum(), (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_matches_peft_outputs_and_kernel_gradients():
    model, twin = twins(attention_bias=True)
    names = (r"layers\.1\.self_attn\.(q|k|v)_proj$",)  # parallel, with no C3A layer downstream (see the docstring)
    params = randomized(lf.init(model, lf.C3AConfig(block_size=16, target_names=names), seed=0), _draw)
    peft_model = peft.get_peft_model(twin, peft.C3AConfig(block_size=16, target_modules=".*" + names[0]))
    assert len(params.targets) == sum(hasattr(m, LEAF) for m in peft_model.modules()) == 3
    copy_into_peft(peft_model, params, _peft_leaf)
    worst = assert_same_as_peft(model, params, peft_model, _peft_leaf)
    assert worst["logits"] <= 1e-5


@pytest.mark.slow
def test_peft_input_gradient_is_wrong_and_lora_funcs_is_not():
    """The reason the parity test above avoids stacked C3A layers: PEFT's input gradient fails a gradcheck."""
    from peft.tuners.c3a.utils import BlockCircularConvolution

    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    assert not torch.autograd.gradcheck(BlockCircularConvolution.apply, (x, w), raise_exception=False)
    assert torch.autograd.gradcheck(circular, (x, w))
    model, twin = twins()  # o_proj upstream of down_proj: outputs still equal, o_proj's gradient does not
    names = r"layers\.1\.(self_attn\.o|mlp\.down)_proj$"
    params = randomized(lf.init(model, lf.C3AConfig(block_size=16, target_names=(names,)), seed=0), _draw)
    peft_model = peft.get_peft_model(twin, peft.C3AConfig(block_size=16, target_modules=".*" + names))
    copy_into_peft(peft_model, params, _peft_leaf)
    batch = qwen3_batch()
    out, ref = lf.apply(model, params, batch), peft_model(**batch)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    first = params.targets[0].path
    assert not torch.allclose(params[first][LEAF].grad, _peft_leaf(peft_layer(peft_model, first), LEAF).grad)


def test_from_peft_gives_peft_logits_and_to_peft_loads_in_peft(tmp_path):
    model, twin = twins()
    model.eval(), twin.eval()
    peft_model = peft.get_peft_model(twin, peft.C3AConfig(block_size=32, target_modules=["q_proj", "down_proj"]))
    peft_model.save_pretrained(tmp_path / "peft")  # PEFT's default init: xavier-uniform kernels
    batch = qwen3_batch()
    with torch.no_grad():
        ref = peft_model(**batch).logits
        params = lf.from_peft(tmp_path / "peft", model)
        assert params.config.block_size == 32 and len(params.targets) == 4
        torch.testing.assert_close(lf.apply(model, params, batch).logits, ref, rtol=0, atol=1e-5)
        lf.to_peft(params, tmp_path / "back", model=model)
        loaded = peft.PeftModel.from_pretrained(twins()[1].eval(), tmp_path / "back")
        torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=1e-5)


def test_block_sizes_are_checked_and_one_is_written_to_peft(tmp_path):
    model = tiny_qwen3()
    with pytest.raises(ValueError, match=r"`block_size`=48 must divide d_in=64 and d_out=64 of 'model.layers.0"):
        lf.init(model, lf.C3AConfig(block_size=48))
    with pytest.raises(ValueError, match=r"`block_size` must be a positive int"):
        lf.C3AConfig(block_size=0)
    params = lf.init(model, lf.C3AConfig(target_names=("q_proj",)), seed=0)  # None: 64 on every q_proj
    lf.to_peft(params, tmp_path, model=model)
    assert '"block_size": 64' in (tmp_path / "adapter_config.json").read_text()
