"""LoKr against its formula (dense ΔW = s W1 ⊗ W2, torch.kron) and against PEFT's LoKr given the same leaves:
outputs, gradients, and files both ways; full and factored leaves as PEFT chooses them per target."""

from __future__ import annotations

import pytest
import torch
from components import cnn_batch, perturbed, qwen3_batch, tiny_cnn, tiny_qwen3
from peft_parity import PROJECTIONS, assert_same_as_peft, copy_into_peft, randomized, twins

import lora_func as lf

peft = pytest.importorskip("peft")

# (r, decompose_both, decompose_factor): W2 full everywhere; W1 and W2 factored; dimensions split by 4.
CASES = [(4, False, -1), (2, True, -1), (3, False, 4)]


def _peft_leaf(layer, leaf):
    return getattr(layer, leaf)["default"]


def _draw(path, leaf, tensor, gen):
    return 0.3 * torch.randn(tensor.shape, generator=gen)


def _w(f, which):
    return f[f"lokr_{which}"] if f"lokr_{which}" in f else f[f"lokr_{which}_a"] @ f[f"lokr_{which}_b"]


@pytest.mark.parametrize(("r", "both", "factor"), CASES)
def test_dense_formula_and_identity_at_init(r, both, factor):
    model = tiny_qwen3().eval()
    cfg = lf.LoKrConfig(r=r, alpha=6.0, decompose_both=both, decompose_factor=factor)
    params = lf.init(model, cfg, seed=0)
    batch = qwen3_batch()
    with torch.no_grad():
        assert torch.equal(lf.apply(model, params, batch).logits, model(**batch).logits)
    params = perturbed(params, seed=4)
    for path, dw in lf.delta_weights(model, params).items():
        f = params[path.removesuffix(".weight")]
        torch.testing.assert_close(dw, 6.0 / r * torch.kron(_w(f, "w1"), _w(f, "w2")), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("r", "both", "factor"), CASES)
def test_matches_peft_outputs_and_gradients(r, both, factor):
    model, twin = twins()
    cfg = lf.LoKrConfig(r=r, decompose_both=both, decompose_factor=factor, target_names=PROJECTIONS)
    params = randomized(lf.init(model, cfg, seed=0), _draw)
    peft_cfg = peft.LoKrConfig(r=r, decompose_both=both, decompose_factor=factor, target_modules=list(PROJECTIONS))
    peft_model = peft.get_peft_model(twin, peft_cfg)
    for path in params:
        layer = peft_model.get_base_model().get_submodule(path)
        held = {
            name
            for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
            if "default" in getattr(layer, name)
        }
        assert held == set(params[path]), path  # PEFT's choice of full and factored leaves, per target
    copy_into_peft(peft_model, params, _peft_leaf)
    worst = assert_same_as_peft(model, params, peft_model, _peft_leaf)
    assert worst["logits"] <= 1e-5


def test_from_peft_gives_peft_logits_and_to_peft_loads_in_peft(tmp_path):
    model, twin = twins()
    model.eval(), twin.eval()
    cfg = peft.LoKrConfig(
        r=2,
        alpha=12,
        decompose_both=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 8},
    )
    peft_model = peft.get_peft_model(twin, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lokr_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(tmp_path / "peft")
    batch = qwen3_batch()
    with torch.no_grad():
        ref = peft_model(**batch).logits
    params = lf.from_peft(tmp_path / "peft", model)
    assert params.config.decompose_both and params.config.alpha == 12
    with torch.no_grad():
        torch.testing.assert_close(lf.apply(model, params, batch).logits, ref, rtol=0, atol=1e-5)

    lf.to_peft(params, tmp_path / "back", model=model)
    loaded = peft.PeftModel.from_pretrained(twins()[1].eval(), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=1e-5)


def test_bad_decompose_factor_names_the_field():
    with pytest.raises(ValueError, match="decompose_factor"):
        lf.LoKrConfig(decompose_factor=0)


CONVS = ["stem", "conv", "mix", "down", "pointwise"]  # plain, "same", grouped, strided, 1×1 (zero padding, as PEFT's)


@pytest.mark.parametrize("r", [1, 2])  # W2 factored (r, n·kh·kw) on most layers at r = 1, full (k, n, kh, kw) at r = 2
def test_convolutions_match_peft_outputs_gradients_and_files(r, tmp_path):
    model, twin = tiny_cnn(), tiny_cnn()
    cfg = lf.LoKrConfig(r=r, alpha=3.0, target_names=(rf"^({'|'.join(CONVS)})$",))
    params = randomized(lf.init(model, cfg, seed=0), _draw)
    peft_model = peft.get_peft_model(twin, peft.LoKrConfig(r=r, alpha=3, target_modules=CONVS))
    for path in params:
        layer = peft_model.get_base_model().get_submodule(path)
        assert {k: tuple(v.shape) for k, v in params[path].items()} == {
            k: tuple(getattr(layer, k)["default"].shape) for k in params[path]
        }
    copy_into_peft(peft_model, params, _peft_leaf)
    x = cnn_batch()
    out, ref = lf.apply(model, params, x), peft_model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    out.square().mean().backward()
    ref.square().mean().backward()
    for path, leaf, tensor in lf.split(params)[0].leaves():
        expected = _peft_leaf(peft_model.get_base_model().get_submodule(path), leaf).grad
        torch.testing.assert_close(tensor.grad, expected, rtol=1e-4, atol=1e-6, msg=f"{path}.{leaf}")

    model.eval(), peft_model.eval()
    lf.to_peft(params, tmp_path, model=model)
    loaded = peft.PeftModel.from_pretrained(tiny_cnn().eval(), tmp_path)
    back = lf.from_peft(tmp_path, model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), peft_model(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(lf.apply(model, back, x), peft_model(x), rtol=0, atol=1e-5)
