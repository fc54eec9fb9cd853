"""FourierFT against its formula (ΔW = s · Re(inverse DFT) of the sparse spectrum, as a float64 sum of cosines) and
against PEFT's FourierFT given the same leaves: outputs, gradients, and files both ways; nn.Linear and
transformers' Conv1D (GPT-2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from components import Calls, qwen3_batch, tiny_gpt2, tiny_qwen3
from peft_parity import (
    PROJECTIONS,
    assert_peft_files_round_trip,
    assert_same_as_peft,
    identity_then_deltas,
    peft_leaf,
    peft_twin,
    randomized,
)

import lora_func as lf

peft = pytest.importorskip("peft")

CASES = {
    "defaults": {"n_frequency": 200},
    "seed 5, scaling 30": {"n_frequency": 500, "random_loc_seed": 5, "scaling": 30.0},
}


def _draw(path, leaf, tensor, gen):
    return 0.01 * torch.randn(tensor.shape, generator=gen)


def _dense(c, d_out, d_in, seed, scaling):
    """s/(d_out·d_in) Σ_k c_k cos(2π (a·u_k / d_out + b·v_k / d_in)), (u_k, v_k) the k-th drawn position."""
    flat = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[: c.shape[0]]
    u, v = (flat // d_in).double(), (flat % d_in).double()
    a, b = torch.arange(d_out, dtype=torch.float64), torch.arange(d_in, dtype=torch.float64)
    phase = 2 * math.pi * (a[:, None, None] * u / d_out + b[None, :, None] * v / d_in)
    return scaling / (d_out * d_in) * (torch.cos(phase) * c.double()).sum(-1)


@pytest.mark.parametrize("case", list(CASES))
def test_dense_formula_and_identity_at_init(case):
    cfg = lf.FourierFTConfig(**CASES[case], target_names=("q_proj", "down_proj"))
    for module, leaves, dw in identity_then_deltas(tiny_qwen3().eval(), cfg):
        c = leaves["fourierft_spectrum"]
        want = _dense(c, module.out_features, module.in_features, cfg.random_loc_seed, cfg.scaling)
        torch.testing.assert_close(dw.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft_outputs_and_gradients(case):
    model, params, peft_model = peft_twin(
        lf.FourierFTConfig(**CASES[case], target_names=PROJECTIONS),
        peft.FourierFTConfig(**CASES[case], target_modules=list(PROJECTIONS)),
        _draw,
    )
    assert_same_as_peft(model, params, peft_model, peft_leaf)


def test_matches_peft_on_conv1d_layers(tmp_path):
    """GPT-2's transformers Conv1D (PEFT's `fan_in_fan_out=True`): same outputs, gradients, and files."""
    targets = ["c_attn", "c_proj", "c_fc"]
    model, params, peft_model = peft_twin(
        lf.FourierFTConfig(n_frequency=100, target_names=tuple(rf"\.{t}$" for t in targets)),
        peft.FourierFTConfig(n_frequency=100, target_modules=targets, fan_in_fan_out=True),
        _draw,
        model=tiny_gpt2(),
        twin=tiny_gpt2(),
    )
    assert len(params.targets) == 8  # c_proj is both attention's and the MLP's
    assert_same_as_peft(model, params, peft_model, peft_leaf)
    model.eval(), peft_model.eval()
    lf.to_peft(params, tmp_path, model=model)
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2().eval(), tmp_path)
    batch = qwen3_batch()
    with torch.no_grad():
        ref = peft_model(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(lf.apply(model, lf.from_peft(tmp_path, model), batch).logits, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_from_peft_gives_peft_logits_and_to_peft_loads_in_peft(case, tmp_path):
    cfg = peft.FourierFTConfig(**CASES[case], target_modules=["q_proj", "v_proj", "down_proj"])
    params = assert_peft_files_round_trip(tmp_path, cfg, "fourierft_spectrum", 0.01)
    got = params.config
    assert (got.n_frequency, got.scaling, got.random_loc_seed) == (cfg.n_frequency, cfg.scaling, cfg.random_loc_seed)


def test_bad_fields_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="`n_frequency` must be a positive int"):
        lf.FourierFTConfig(n_frequency=0)
    with pytest.raises(ValueError, match="`n_frequency`=5000 exceeds the 4096 entries"):
        lf.init(tiny_qwen3(), lf.FourierFTConfig(n_frequency=5000, target_names=("q_proj",)))
    cfg = peft.FourierFTConfig(n_frequency=10, target_modules=["q_proj"], n_frequency_pattern={"q_proj": 20})
    peft.get_peft_model(tiny_qwen3(), cfg).save_pretrained(tmp_path)
    with pytest.raises(lf.AdapterFileError, match="n_frequency_pattern"):
        lf.from_peft(tmp_path, tiny_qwen3())


def test_a_call_of_one_adapter_runs_each_target_once():
    """On float nn.Linear targets a call of one adapter runs x (W + ΔW)ᵀ + b, one product (the parameter form), where
    PEFT and mixed batches compute x Wᵀ + b + x ΔWᵀ; the two agree to rounding."""
    model = tiny_qwen3()
    params = randomized(lf.init(model, lf.FourierFTConfig(n_frequency=200, target_names=PROJECTIONS), seed=0), _draw)
    batch = qwen3_batch()
    with Calls(F.linear) as base_calls:
        model(**batch)
    with Calls(F.linear) as calls:
        logits = lf.apply(model, params, batch).logits
    assert calls.count == base_calls.count == 7 * 2 + 1
    with Calls(F.linear) as mixed_calls:
        rows = lf.apply(model, lf.stack([params, params]), batch, adapter_ids=[1] * len(batch["input_ids"])).logits
    assert mixed_calls.count == base_calls.count + 7 * 2
    torch.testing.assert_close(rows, logits, rtol=0, atol=1e-5)
