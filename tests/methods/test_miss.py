"""MiSS against its formula (ΔW[o, i] = M[i mod r, o], built entry by entry) and against PEFT's MiSS given the same
leaves: outputs, gradients, and files both ways; r dividing d_in or not, PEFT's "mini" blocks, a 4-bit base."""

from __future__ import annotations

import pytest
import torch
from components import tiny_qwen3
from peft_parity import (
    PROJECTIONS,
    assert_peft_files_round_trip,
    assert_same_as_peft,
    identity_then_deltas,
    peft_leaf,
    peft_twin,
    twins,
)

import lora_func as lf

peft = pytest.importorskip("peft")

# MiSSConfig fields, as PEFT's MissConfig takes them: r divides d_in (64, 128); r = 6 does not (x padded); "mini".
CASES = {
    "r 4": {"r": 4},
    "r 6, padded": {"r": 6},
    "mini": {"r": 4, "init_weights": "mini", "mini_r": 16},
}


def _draw(path, leaf, tensor, gen):
    return 0.1 * torch.randn(tensor.shape, generator=gen)


def _dense(M, d_out, d_in):
    """ΔW from the definition: entry (o, i) is M[i mod r, o] (M repeated along the outputs in "mini")."""
    r = M.shape[0]
    return torch.stack([torch.stack([M[i % r, o % M.shape[1]] for i in range(d_in)]) for o in range(d_out)])


@pytest.mark.parametrize("case", list(CASES))
def test_dense_formula_and_identity_at_init(case):
    cfg = lf.MiSSConfig(**CASES[case], target_names=("q_proj", "down_proj"))
    for module, leaves, dw in identity_then_deltas(tiny_qwen3().eval(), cfg):
        assert torch.equal(dw, _dense(leaves["miss_block"], module.out_features, module.in_features))


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft_outputs_and_gradients(case):
    model, params, peft_model = peft_twin(
        lf.MiSSConfig(**CASES[case], target_names=PROJECTIONS),
        peft.MissConfig(**CASES[case], target_modules=list(PROJECTIONS)),
        _draw,
    )
    assert_same_as_peft(model, params, peft_model, peft_leaf)


def test_matches_peft_on_a_4bit_base():
    """PEFT's MiSS wraps bitsandbytes' Linear4bit: the same base, the same leaves, the same step."""
    model, twin = twins(bits=4)
    model, params, peft_model = peft_twin(
        lf.MiSSConfig(r=4, target_names=PROJECTIONS),
        peft.MissConfig(r=4, target_modules=list(PROJECTIONS)),
        _draw,
        model=model,
        twin=twin,
    )
    assert_same_as_peft(model, params, peft_model, peft_leaf)


@pytest.mark.parametrize("case", ["r 6, padded", "mini"])
def test_from_peft_gives_peft_logits_and_to_peft_loads_in_peft(case, tmp_path):
    cfg = peft.MissConfig(**CASES[case], target_modules=["q_proj", "v_proj", "down_proj"])
    params = assert_peft_files_round_trip(tmp_path, cfg, "miss_block", 0.1)
    got, want = params.config, lf.MiSSConfig(**CASES[case])
    assert (got.r, got.init_weights, got.mini_r) == (want.r, want.init_weights, want.mini_r)


def test_bat_and_bad_fields_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="`init_weights` must be true, false or 'mini', got 'bat'"):
        lf.MiSSConfig(init_weights="bat")
    with pytest.raises(ValueError, match="`mini_r` must be a positive int"):
        lf.MiSSConfig(mini_r=0)
    with pytest.raises(ValueError, match="`r`=80 exceeds d_in=64"):
        lf.init(tiny_qwen3(), lf.MiSSConfig(r=80, target_names=("q_proj",)))
    with pytest.raises(ValueError, match="`mini_r`=5 does not divide d_out=64"):
        lf.init(tiny_qwen3(), lf.MiSSConfig(r=4, init_weights="mini", mini_r=5, target_names=("q_proj",)))
    model = tiny_qwen3()
    cfg = peft.MissConfig(r=4, init_weights="bat", target_modules=["q_proj"])
    peft.get_peft_model(tiny_qwen3(), cfg).save_pretrained(tmp_path)
    with pytest.raises(lf.AdapterFileError, match="init_weights"):
        lf.from_peft(tmp_path, model)
