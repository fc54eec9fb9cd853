"""RandLoRA against its formula (a float64 sum over the r · n paired base columns, as PEFT pairs them) and against
PEFT's RandLoRA given the same leaves: the shared bases drawn bitwise as PEFT draws them, outputs, gradients, a
4-bit and an 8-bit base, transformers' Conv1D, and PEFT files both ways (trained by PEFT; bases stored or drawn
again)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from components import qwen3_batch, tiny_gpt2, tiny_qwen3
from conftest import tiny_qwen3_8bit
from peft_parity import (
    ALL_PROJECTIONS,
    PROJECTIONS,
    assert_same_as_peft,
    assert_trained_peft_files_round_trip,
    identity_then_deltas,
    peft_leaf,
    peft_twin,
    twins,
)
from safetensors.torch import load_file, save_file

import lora_func as lf
from lora_func._params import SHARED

peft = pytest.importorskip("peft")

BASES = {"dense": {}, "sparse": {"sparse": True}, "very sparse": {"very_sparse": True}}


def _draw(path, leaf, tensor, gen):
    return tensor + 0.05 * torch.randn(tensor.shape, generator=gen)


def _dense(leaves, d_in, d_out, r, s):
    """s Σ_k b_k a_kᵀ in float64, k over r · n: B's column k is base k // r, rank k % r; A's row k is rank k // n,
    base k % n, scaled by λ and γ (PEFT flattens the two in these orders); then laid out (d_out, d_in)."""
    lam, gamma = leaves["randlora_lambda"].double(), leaves["randlora_gamma"].double()
    n, m = gamma.shape
    A, B = leaves["randlora_A"].double(), leaves["randlora_B"].double()
    big = max(d_in, d_out)
    dw = torch.zeros(big, m, dtype=torch.float64)
    for k in range(r * n):
        b_col = B[:big, k // r, k % r]
        j, b = divmod(k, n)
        a_row = lam[j, b] * A[j, 0, :m] * gamma[b]
        dw += torch.outer(b_col, a_row)
    return s * (dw if d_in <= d_out else dw.T)


@pytest.mark.parametrize("r", [4, 6])
def test_dense_formula_and_identity_at_init(r):
    model = tiny_qwen3().eval()
    cfg = lf.RandLoRAConfig(r=r, randlora_alpha=12.0, target_names=("q_proj", "k_proj", "up_proj", "down_proj"))
    found = identity_then_deltas(model, cfg)
    assert len(found) == 8
    shared = lf.init(model, cfg)[SHARED]  # frozen: the same bases after `perturbed`
    for module, leaves, dw in found:
        want = _dense({**leaves, **shared}, module.in_features, module.out_features, r, 12.0 / r)
        torch.testing.assert_close(dw.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bases", list(BASES))
def test_bases_and_init_are_peft_bitwise(bases):
    model, twin = twins()
    cfg = lf.RandLoRAConfig(r=8, projection_prng_key=5, target_names=ALL_PROJECTIONS, **BASES[bases])
    params = lf.init(model, cfg, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(
            twin, peft.RandLoraConfig(r=8, projection_prng_key=5, target_modules=list(PROJECTIONS), **BASES[bases])
        )
    assert torch.equal(params[SHARED]["randlora_A"], peft_model.base_model.randlora_A["default"])
    assert torch.equal(params[SHARED]["randlora_B"], peft_model.base_model.randlora_B["default"])
    for target in params.targets:
        layer = peft_model.get_base_model().get_submodule(target.path)
        for leaf in ("randlora_lambda", "randlora_gamma"):
            assert torch.equal(params[target.path][leaf], peft_leaf(layer, leaf).detach()), (target.path, leaf)
    assert not lf.split(params)[0][SHARED]  # the bases do not train


@pytest.mark.parametrize("bits", [None, 4])
def test_matches_peft_outputs_and_gradients(bits):
    model, twin = twins(bits=bits) if bits else twins(attention_bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, params, peft_model = peft_twin(
            lf.RandLoRAConfig(r=8, randlora_alpha=16.0, target_names=ALL_PROJECTIONS),
            peft.RandLoraConfig(r=8, randlora_alpha=16, target_modules=list(PROJECTIONS)),
            _draw,
            model=model,
            twin=twin,
        )
    batch = qwen3_batch()
    with torch.no_grad():
        assert not torch.allclose(lf.apply(model, params, batch).logits, model(**batch).logits)
    assert_same_as_peft(model, params, peft_model, peft_leaf)


def test_matches_peft_on_an_8bit_base():
    """PEFT's RandLoRA wraps bitsandbytes' Linear8bitLt (its `randlora.bnb.Linear8bitLt`): the same int8 base,
    leaves, step."""
    model, twin = tiny_qwen3_8bit(), tiny_qwen3_8bit()
    twin.is_loaded_in_8bit = True  # as from_pretrained's quantization sets it: PEFT picks its bitsandbytes layer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, params, peft_model = peft_twin(
            lf.RandLoRAConfig(r=8, randlora_alpha=16.0, target_names=ALL_PROJECTIONS),
            peft.RandLoraConfig(r=8, randlora_alpha=16, target_modules=list(PROJECTIONS)),
            _draw,
            model=model,
            twin=twin,
        )
    layer = peft_model.get_base_model().get_submodule(params.targets[0].path)
    assert (type(layer).__module__, type(layer).__name__) == ("peft.tuners.randlora.bnb", "Linear8bitLt")
    batch = qwen3_batch()
    with torch.no_grad():
        assert not torch.allclose(lf.apply(model, params, batch).logits, model(**batch).logits)
    worst = assert_same_as_peft(model, params, peft_model, peft_leaf)
    assert worst["logits"] <= 1e-5 and worst["grad"] <= 1e-5


def test_matches_peft_on_conv1d_layers(tmp_path):
    """GPT-2's transformers Conv1D (PEFT's `fan_in_fan_out=True`): same outputs, gradients, and files."""
    targets = ["c_attn", "c_proj", "c_fc"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, params, peft_model = peft_twin(
            lf.RandLoRAConfig(r=4, randlora_alpha=8.0, target_names=tuple(rf"\.{t}$" for t in targets)),
            peft.RandLoraConfig(r=4, randlora_alpha=8, target_modules=targets, fan_in_fan_out=True),
            _draw,
            model=tiny_gpt2(),
            twin=tiny_gpt2(),
        )
    assert_same_as_peft(model, params, peft_model, peft_leaf)
    model.eval(), peft_model.eval()
    lf.to_peft(params, tmp_path, model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_gpt2().eval(), tmp_path)
    batch = qwen3_batch()
    with torch.no_grad():
        ref = peft_model(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(lf.apply(model, lf.from_peft(tmp_path, model), batch).logits, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bases", ["dense", "sparse"])
def test_from_peft_of_a_trained_adapter_and_back(bases, tmp_path):
    cfg = peft.RandLoraConfig(
        r=8, randlora_alpha=32, projection_prng_key=2, target_modules=["q_proj", "k_proj", "down_proj"], **BASES[bases]
    )
    params = assert_trained_peft_files_round_trip(tmp_path, cfg)
    got = params.config
    assert (got.r, got.randlora_alpha, got.projection_prng_key, got.sparse) == (8, 32, 2, bases == "sparse")
    written = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert torch.equal(written["base_model.randlora_A"], params[SHARED]["randlora_A"])
    path = params.targets[0].path  # PEFT's layout: the bases also under every target
    assert torch.equal(written[f"base_model.model.{path}.randlora_B"], params[SHARED]["randlora_B"])


def test_from_peft_without_stored_bases_draws_them_again(tmp_path):
    model, twin = twins()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.RandLoraConfig(r=8, save_projection=False, projection_prng_key=9, target_modules=["v_proj"])
        peft_model = peft.get_peft_model(twin, cfg).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "randlora_lambda" in name:
                p.copy_(0.1 * torch.randn(p.shape))
    peft_model.save_pretrained(tmp_path)
    assert not any("randlora_A" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    batch = qwen3_batch()
    with torch.no_grad():
        got = lf.apply(model.eval(), lf.from_peft(tmp_path, model), batch).logits
        torch.testing.assert_close(got, peft_model(**batch).logits, rtol=0, atol=1e-5)


def test_bad_input_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="`projection_prng_key`"):
        lf.RandLoRAConfig(projection_prng_key=-1)
    with pytest.raises(ValueError, match="`rank_pattern` must be empty"):
        lf.RandLoRAConfig(rank_pattern={"q_proj": 2})
    with pytest.raises(TypeError, match="`randlora_alpha`"):
        lf.RandLoRAConfig(randlora_alpha="640")
    model = tiny_qwen3()
    params = lf.init(model, lf.RandLoRAConfig(r=8, target_names=("q_proj",)))
    lf.to_peft(params, tmp_path, model=model)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = f"base_model.model.{params.targets[0].path}.randlora_A"
    tensors[key] = tensors[key] + 1  # a per-target copy that is not the shared base
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(lf.AdapterFileError, match=f"key '{key}' is not the shared 'base_model.randlora_A'"):
        lf.from_peft(tmp_path, model)
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    assert fields["save_projection"] is True and fields["randlora_alpha"] == 640
