"""LoKr against its formula (dense ΔW = s W1 ⊗ W2, torch.kron) and against PEFT's LoKr given the same leaves:
outputs, gradients, and files both ways; full and factored leaves as PEFT chooses them per target."""

from __future__ import annotations

import pytest
import torch
from components import perturbed, qwen3_batch, tiny_cnn, tiny_qwen3
from peft_parity import (
    CONVS,
    PROJECTIONS,
    assert_convolutions_match_peft,
    assert_peft_files_round_trip,
    assert_same_as_peft,
    peft_leaf,
    peft_twin,
)

import lora_func as lf

peft = pytest.importorskip("peft")

# (r, decompose_both, decompose_factor): W2 full everywhere; W1 and W2 factored; dimensions split by 4.
CASES = [(4, False, -1), (2, True, -1), (3, False, 4)]


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
    cfg = lf.LoKrConfig(r=r, decompose_both=both, decompose_factor=factor, target_names=PROJECTIONS)
    peft_cfg = peft.LoKrConfig(r=r, decompose_both=both, decompose_factor=factor, target_modules=list(PROJECTIONS))
    model, params, peft_model = peft_twin(cfg, peft_cfg, _draw)
    for path in params:
        layer = peft_model.get_base_model().get_submodule(path)
        held = {
            name
            for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
            if "default" in getattr(layer, name)
        }
        assert held == set(params[path]), path  # PEFT's choice of full and factored leaves, per target
    assert_same_as_peft(model, params, peft_model, peft_leaf)


def test_from_peft_gives_peft_logits_and_to_peft_loads_in_peft(tmp_path):
    cfg = peft.LoKrConfig(
        r=2,
        alpha=12,
        decompose_both=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 8},
    )
    params = assert_peft_files_round_trip(tmp_path, cfg, "lokr_", 0.3)
    assert params.config.decompose_both and params.config.alpha == 12


def test_bad_decompose_factor_names_the_field():
    with pytest.raises(ValueError, match="decompose_factor"):
        lf.LoKrConfig(decompose_factor=0)


@pytest.mark.parametrize("r", [1, 2])  # W2 factored (r, n·kh·kw) on most layers at r = 1, full (k, n, kh, kw) at r = 2
def test_convolutions_match_peft_outputs_gradients_and_files(r, tmp_path):
    cfg = lf.LoKrConfig(r=r, alpha=3.0, target_names=(rf"^({'|'.join(CONVS)})$",))
    peft_cfg = peft.LoKrConfig(r=r, alpha=3, target_modules=CONVS)
    model = tiny_cnn()
    shapes = {path: {k: tuple(v.shape) for k, v in leaves.items()} for path, leaves in lf.init(model, cfg).items()}
    peft_model = peft.get_peft_model(tiny_cnn(), peft_cfg)
    for path, held in shapes.items():
        layer = peft_model.get_base_model().get_submodule(path)
        assert held == {k: tuple(getattr(layer, k)["default"].shape) for k in held}, path
    assert_convolutions_match_peft(tmp_path, cfg, peft_cfg, _draw)
