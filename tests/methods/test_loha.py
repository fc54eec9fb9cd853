"""LoHa against its formula (dense ΔW = s (W1a W1b) ⊙ (W2a W2b)) and against PEFT's LoHa given the same leaves:
outputs, gradients, and files both ways."""

from __future__ import annotations

import pytest
import torch
from components import perturbed, qwen3_batch, tiny_qwen3
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


def _draw(path, leaf, tensor, gen):
    return 0.3 * torch.randn(tensor.shape, generator=gen)


def test_dense_formula_and_identity_at_init():
    model = tiny_qwen3().eval()
    params = lf.init(model, lf.LoHaConfig(r=4, alpha=6.0), seed=0)
    batch = qwen3_batch()
    with torch.no_grad():
        assert torch.equal(lf.apply(model, params, batch).logits, model(**batch).logits)
    params = perturbed(params, seed=4)
    for path, dw in lf.delta_weights(model, params).items():
        f = params[path.removesuffix(".weight")]
        want = (
            1.5
            * torch.einsum("or,ri->oi", f["hada_w1_a"], f["hada_w1_b"])
            * torch.einsum("or,ri->oi", f["hada_w2_a"], f["hada_w2_b"])
        )
        torch.testing.assert_close(dw, want, rtol=1e-6, atol=1e-7)


def test_matches_peft_outputs_and_gradients():
    model, params, peft_model = peft_twin(
        lf.LoHaConfig(r=4, target_names=PROJECTIONS), peft.LoHaConfig(r=4, target_modules=list(PROJECTIONS)), _draw
    )
    assert len(params.targets) == sum(hasattr(m, "hada_w1_a") for m in peft_model.modules()) == 14
    assert_same_as_peft(model, params, peft_model, peft_leaf)


def test_from_peft_gives_peft_logits_and_to_peft_loads_in_peft(tmp_path):
    cfg = peft.LoHaConfig(
        r=4, alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2}
    )
    params = assert_peft_files_round_trip(tmp_path, cfg, "hada_", 0.3)
    assert params.config.r == 4 and params.config.alpha == 12


def test_peft_fields_it_cannot_honour_are_refused(tmp_path):
    model = tiny_qwen3()
    peft.get_peft_model(tiny_qwen3(), peft.LoHaConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    config = tmp_path / "adapter_config.json"
    config.write_text(config.read_text().replace('"use_effective_conv2d": false', '"use_effective_conv2d": true'))
    with pytest.raises(lf.AdapterFileError, match="use_effective_conv2d"):
        lf.from_peft(tmp_path, model)


def test_convolutions_match_peft_outputs_gradients_and_files(tmp_path):
    """nn.Conv2d targets (grouped, strided, 1×1 too): PEFT's LoHa on the flattened kernel, given the same leaves."""
    cfg = lf.LoHaConfig(r=2, alpha=3.0, target_names=(rf"^({'|'.join(CONVS)})$",))
    assert_convolutions_match_peft(tmp_path, cfg, peft.LoHaConfig(r=2, alpha=3, target_modules=CONVS), _draw)
