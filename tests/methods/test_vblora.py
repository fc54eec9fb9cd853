"""VBLoRA against its formula (each tile a float64 top-k mixture of bank vectors, ΔW = B A) and against PEFT's VBLoRA
given the same leaves: outputs and gradients, the shared trainable bank's too (one gradient summed over all
targets), a 4-bit base, transformers' Conv1D, PEFT files both ways (trained by PEFT), and PEFT's compact
`save_only_topk_weights` files read and written."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from components import qwen3_batch, tiny_gpt2, tiny_qwen3
from peft_parity import (
    ALL_PROJECTIONS,
    PROJECTIONS,
    assert_trained_peft_files_round_trip,
    peft_layer,
    peft_leaf,
    twins,
)
from safetensors.torch import load_file

import lora_func as lf
from lora_func._params import SHARED

peft = pytest.importorskip("peft")

SMALL = {"r": 4, "num_vectors": 16, "vector_length": 16}


def _mixture(logits, bank, k):
    """(…, L) in float64: Σ over the k largest logits of softmax(those logits)_i · bank_i, by a loop over rows."""
    rows = logits.double().reshape(-1, logits.shape[-1])
    out = torch.zeros(rows.shape[0], bank.shape[1], dtype=torch.float64)
    for i, row in enumerate(rows):
        top = sorted(range(row.numel()), key=lambda j: -row[j].item())[:k]
        weights = torch.softmax(row[top], dim=0)
        out[i] = sum(w * bank[j].double() for w, j in zip(weights, top))
    return out.reshape(*logits.shape[:-1], bank.shape[1])


def test_dense_formula_and_not_the_identity_at_init():
    model = tiny_qwen3().eval()
    cfg = lf.VBLoRAConfig(**SMALL, topk=3, target_names=("q_proj", "k_proj", "down_proj"))
    params = lf.init(model, cfg, seed=0)
    bank = params[SHARED]["vblora_vector_bank"].detach()
    assert bank.abs().max() <= cfg.init_vector_bank_bound and bank.abs().max() > 0
    batch = qwen3_batch()
    with torch.no_grad():  # waived: the method starts from a random bank and random logits, as PEFT's
        assert not torch.allclose(lf.apply(model, params, batch).logits, model(**batch).logits)
    deltas = lf.delta_weights(model, params)
    for target in params.targets:
        leaves = params[target.path]
        A = _mixture(leaves["vblora_logits_A"].detach(), bank, 3).reshape(4, target.d_in)  # (r, d_in/L, L)
        B = _mixture(leaves["vblora_logits_B"].detach(), bank, 3)  # (d_out/L, r, L)
        B = B.transpose(1, 2).reshape(target.d_out, 4)
        torch.testing.assert_close(deltas[f"{target.path}.weight"].double(), B @ A, rtol=1e-5, atol=1e-8)


def _peft_twin(model, twin, cfg, peft_cfg):
    """Same leaves in both, the bank included (PEFT's one `vblora_vector_bank` parameter)."""
    params = lf.init(model, cfg, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(twin, peft_cfg)
    with torch.no_grad():
        for path, leaf, tensor in params.leaves():
            target = _peft_param(peft_model, path, leaf)
            target.copy_(tensor)
    return params, peft_model


def _peft_param(peft_model, path, leaf):
    if path == SHARED:
        return peft_model.base_model.vblora_vector_bank["default"]
    return peft_leaf(peft_layer(peft_model, path), leaf)


def _assert_same_as_peft(model, params, peft_model, batch):
    out, ref = lf.apply(model, params, batch), peft_model(**batch)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    worst = {"logits": (out.logits - ref.logits).abs().max().item(), "grad": 0.0}
    for path, leaf, tensor in lf.split(params)[0].leaves():
        expected = _peft_param(peft_model, path, leaf).grad
        torch.testing.assert_close(tensor.grad, expected, rtol=1e-4, atol=1e-6, msg=f"{path}.{leaf}")
        worst["grad"] = max(worst["grad"], (tensor.grad - expected).abs().max().item())
    assert lf.split(params)[0][SHARED]["vblora_vector_bank"].grad.abs().sum() > 0  # the bank trains
    return worst


@pytest.mark.parametrize("bits", [None, 4])
def test_matches_peft_outputs_and_gradients(bits):
    model, twin = twins(bits=bits) if bits else twins(attention_bias=True)
    params, peft_model = _peft_twin(
        model,
        twin,
        lf.VBLoRAConfig(**SMALL, target_names=ALL_PROJECTIONS),
        peft.VBLoRAConfig(**SMALL, target_modules=list(PROJECTIONS)),
    )
    _assert_same_as_peft(model, params, peft_model, qwen3_batch())


def test_matches_peft_on_conv1d_layers(tmp_path):
    """GPT-2's transformers Conv1D (PEFT's `fan_in_fan_out=True`): same outputs, gradients, and files."""
    targets = ["c_attn", "c_proj", "c_fc"]
    model = tiny_gpt2()
    params, peft_model = _peft_twin(
        model,
        tiny_gpt2(),
        lf.VBLoRAConfig(r=4, num_vectors=16, vector_length=8, target_names=tuple(rf"\.{t}$" for t in targets)),
        peft.VBLoRAConfig(r=4, num_vectors=16, vector_length=8, target_modules=targets, fan_in_fan_out=True),
    )
    batch = qwen3_batch()
    _assert_same_as_peft(model, params, peft_model, batch)
    model.eval(), peft_model.eval()
    lf.to_peft(params, tmp_path, model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_gpt2().eval(), tmp_path)
    with torch.no_grad():
        ref = peft_model(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(lf.apply(model, lf.from_peft(tmp_path, model), batch).logits, ref, rtol=0, atol=1e-5)


def test_from_peft_of_a_trained_adapter_and_back(tmp_path):
    cfg = peft.VBLoRAConfig(**SMALL, topk=3, target_modules=["q_proj", "k_proj", "down_proj"])
    params = assert_trained_peft_files_round_trip(tmp_path, cfg)
    got = params.config
    assert (got.r, got.num_vectors, got.vector_length, got.topk) == (4, 16, 16, 3)
    assert "base_model.vblora_vector_bank" in load_file(tmp_path / "back" / "adapter_model.safetensors")


@pytest.mark.parametrize("topk", [1, 2, 3])
def test_top_k_files_read_and_written(topk, tmp_path):
    """PEFT's `save_only_topk_weights` file (indices + weights): `from_peft` gives the logits PEFT gives after
    loading it, with finite leaves; `to_peft` with the field set writes that layout, which PEFT loads."""
    model, twin = twins()
    fields = dict(SMALL, topk=topk, target_modules=["q_proj", "down_proj"], save_only_topk_weights=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(twin, peft.VBLoRAConfig(**fields)).save_pretrained(tmp_path / "peft")
        loaded = peft.PeftModel.from_pretrained(twins()[1].eval(), tmp_path / "peft")
    stored = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert any(k.endswith("_topk_indices") for k in stored) and not any(k.endswith("logits_A") for k in stored)
    batch = qwen3_batch()
    params = lf.from_peft(tmp_path / "peft", model.eval())
    assert params.config.save_only_topk_weights and all(torch.isfinite(t).all() for _, _, t in params.leaves())
    with torch.no_grad():
        ref = loaded(**batch).logits
        torch.testing.assert_close(lf.apply(model, params, batch).logits, ref, rtol=0, atol=1e-5)

    lf.to_peft(params, tmp_path / "back", model=model)
    written = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert written.keys() == stored.keys() and all(written[k].dtype == stored[k].dtype for k in stored)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(twins()[1].eval(), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, ref, rtol=0, atol=1e-5)


def test_stacked_adapters_share_nothing_but_each_trains_its_own_bank():
    model = tiny_qwen3().eval()
    cfg = lf.VBLoRAConfig(**SMALL, target_names=("q_proj", "v_proj"))
    one, two = lf.init(model, cfg, seed=0), lf.init(model, cfg, seed=1)
    batch = qwen3_batch(batch=2)
    stacked = lf.stack([one, two])
    out = lf.apply(model, stacked, {"input_ids": batch["input_ids"]}, adapter_ids=torch.tensor([1, 0])).logits
    with torch.no_grad():
        torch.testing.assert_close(out[0], lf.apply(model, two, batch).logits[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out[1], lf.apply(model, one, batch).logits[1], rtol=0, atol=1e-5)
    out[0].sum().backward()  # row 0 runs adapter 1 only: only its bank gets a gradient
    bank = stacked[SHARED]["vblora_vector_bank"].grad
    assert bank[1].abs().sum() > 0 and bank[0].abs().sum() == 0


def test_bad_input_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="`topk`=5 exceeds `num_vectors`=4"):
        lf.VBLoRAConfig(num_vectors=4, topk=5)
    with pytest.raises(ValueError, match="`vector_length`"):
        lf.VBLoRAConfig(vector_length=0)
    with pytest.raises(ValueError, match=r"`vector_length`=48 must divide d_in and d_out of 'model.layers.0"):
        lf.init(tiny_qwen3(), lf.VBLoRAConfig(vector_length=48, target_names=("q_proj",)))
    model = tiny_qwen3()
    params = lf.init(model, lf.VBLoRAConfig(**SMALL, target_names=("q_proj",), save_only_topk_weights=True))
    lf.to_peft(params, tmp_path, model=model)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("logits_A_topk_indices"))
    tensors[key] = torch.full_like(tensors[key], 200)
    from safetensors.torch import save_file

    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(lf.AdapterFileError, match=rf"key '{key}' holds indices outside \[0, num_vectors=16\)"):
        lf.from_peft(tmp_path, model)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["save_only_topk_weights"] is True
