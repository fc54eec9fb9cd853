"""LN Tuning against its definition (the layer run with the leaves as its weight and bias) and against PEFT's LN
Tuning given the same leaves: outputs, gradients, and files both ways; RMSNorm (Qwen3) and LayerNorm with a bias
(BERT)."""

from __future__ import annotations

import copy

import pytest
import torch
from components import Calls, classification_batch, perturbed, qwen3_batch, tiny_bert_classifier, tiny_qwen3
from peft_parity import assert_same_as_peft, copy_into_peft, randomized, twins

import lora_func as lf

peft = pytest.importorskip("peft")
# PEFT's LN Tuning wraps norm layers, which PEFT's feature-size reader warns about (it wraps them all the same).
pytestmark = pytest.mark.filterwarnings("ignore:Unsupported layer type:UserWarning")

NORMS = ["input_layernorm", "post_attention_layernorm", "norm"]  # PEFT's names for Llama-like models
NORM_NAMES = (r"(input_layernorm|post_attention_layernorm|model\.norm)$",)


def _peft_leaf(layer, leaf):
    return getattr(layer.ln_tuning_layers["default"], leaf)


def _draw(path, leaf, tensor, gen):
    return tensor + 0.3 * torch.randn(tensor.shape, generator=gen)


def test_identity_at_init_and_the_layer_run_with_the_leaves():
    model = tiny_qwen3().eval()
    params = lf.init(model, lf.LNTuningConfig(), seed=0)
    paths = [t.path for t in params.targets]
    assert len(paths) == 2 * 4 + 1 and all(t.kind == "norm" for t in params.targets)  # q/k/input/post norms, final
    for path in paths:  # copies of the layer's own weight
        assert torch.equal(params[path]["weight"], model.get_submodule(path).weight)
    batch = qwen3_batch()
    with torch.no_grad():
        assert torch.equal(lf.apply(model, params, batch).logits, model(**batch).logits)
    params = perturbed(params, seed=4)
    edited = copy.deepcopy(model)  # the definition: the model with the leaves as its norms' weights
    with torch.no_grad():
        for path in paths:
            edited.get_submodule(path).weight.copy_(params[path]["weight"])
        torch.testing.assert_close(lf.apply(model, params, batch).logits, edited(**batch).logits, rtol=0, atol=1e-6)
    for key, dw in lf.delta_weights(model, params).items():
        path = key.removesuffix(".weight")
        assert torch.equal(dw, (params[path]["weight"] - model.get_submodule(path).weight).detach())


def test_matches_peft_outputs_and_gradients_rmsnorm():
    model, twin = twins()
    params = randomized(lf.init(model, lf.LNTuningConfig(target_names=NORM_NAMES), seed=0), _draw)
    peft_model = peft.get_peft_model(twin, peft.LNTuningConfig(target_modules=NORMS))
    assert len(params.targets) == sum(hasattr(m, "ln_tuning_layers") for m in peft_model.modules()) == 5
    copy_into_peft(peft_model, params, _peft_leaf)
    worst = assert_same_as_peft(model, params, peft_model, _peft_leaf)
    assert worst["logits"] <= 1e-5


def test_matches_peft_on_layernorm_with_bias_and_files_both_ways(tmp_path):
    """BERT's LayerNorms (weight and bias): same outputs and gradients as PEFT; from_peft / to_peft exact."""
    model, twin = tiny_bert_classifier(), tiny_bert_classifier()
    cfg = lf.LNTuningConfig(target_names=(r"LayerNorm$",), modules_to_save=("classifier",))
    params = randomized(lf.init(model, cfg, seed=0), _draw)
    assert {frozenset(params[t.path]) for t in params.targets if t.kind == "norm"} == {frozenset({"weight", "bias"})}
    peft_model = peft.get_peft_model(twin, peft.LNTuningConfig(target_modules=["LayerNorm"]))
    norms = [t.path for t in params.targets if t.kind == "norm"]
    with torch.no_grad():
        for path in norms:
            for leaf, tensor in params[path].items():
                _peft_leaf(peft_model.get_base_model().get_submodule(path), leaf).copy_(tensor)
        twin.classifier.load_state_dict({k: v.detach() for k, v in params["classifier"].items()})
    batch = classification_batch()
    out, ref = lf.apply(model, params, batch), peft_model(**batch)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for path in norms:
        for leaf, tensor in params[path].items():
            expected = _peft_leaf(peft_model.get_base_model().get_submodule(path), leaf).grad
            torch.testing.assert_close(tensor.grad, expected, rtol=1e-4, atol=1e-6, msg=f"{path}.{leaf}")

    peft_model.eval(), model.eval()
    ln_only = lf.init(model, lf.LNTuningConfig(target_names=(r"LayerNorm$",)), seed=0)
    ln_only = ln_only.replace({p: {k: v.detach() for k, v in params[p].items()} for p in norms})
    twin_plain = peft.get_peft_model(tiny_bert_classifier(), peft.LNTuningConfig(target_modules=["LayerNorm"]))
    with torch.no_grad():
        for path in norms:
            for leaf, tensor in params[path].items():
                _peft_leaf(twin_plain.get_base_model().get_submodule(path), leaf).copy_(tensor)
    twin_plain.eval().save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        ref = twin_plain(**batch).logits
        back = lf.from_peft(tmp_path / "peft", model)
        torch.testing.assert_close(lf.apply(model, back, batch).logits, ref, rtol=0, atol=1e-5)
        lf.to_peft(ln_only, tmp_path / "out", model=model)
        loaded = peft.PeftModel.from_pretrained(tiny_bert_classifier().eval(), tmp_path / "out")
        torch.testing.assert_close(loaded(**batch).logits, lf.apply(model, ln_only, batch).logits, rtol=0, atol=1e-5)


def test_qwen3_files_both_ways(tmp_path):
    model, twin = twins()
    model.eval(), twin.eval()
    peft_model = peft.get_peft_model(twin, peft.LNTuningConfig(target_modules=NORMS))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ln_tuning_layers" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(tmp_path / "peft")
    batch = qwen3_batch()
    with torch.no_grad():
        ref = peft_model(**batch).logits
        params = lf.from_peft(tmp_path / "peft", model)
        assert len(params.targets) == 5
        torch.testing.assert_close(lf.apply(model, params, batch).logits, ref, rtol=0, atol=1e-5)
        lf.to_peft(params, tmp_path / "back", model=model)
        loaded = peft.PeftModel.from_pretrained(twins()[1].eval(), tmp_path / "back")
        torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=1e-5)


def test_a_linear_layer_is_refused_and_norms_pass_quietly_for_other_variants():
    model = tiny_qwen3()
    with pytest.raises(ValueError, match=r"LNTuningConfig cannot adapt 'model.layers.0.self_attn.q_proj'"):
        lf.init(model, lf.LNTuningConfig(target_names=("q_proj",)))
    # A LoRA whose pattern also matches the attention's q_norm / k_norm adapts the projections alone, as before.
    paths = [t.path for t in lf.targets(model, lf.LoRAConfig(target_names=(r"layers\.0\.self_attn",)))]
    assert paths and all(p.endswith("_proj") for p in paths)


def test_a_call_of_one_adapter_runs_each_norm_once_as_peft():
    """The norm runs once, with the leaves in place of its parameters (the parameter form), not the base norm and
    then the norm again on the leaves; mixed batches run at the output, and both give the same rows."""
    model = tiny_qwen3()
    params = perturbed(lf.init(model, lf.LNTuningConfig(), seed=0), seed=4)
    batch = qwen3_batch()
    with Calls(torch.rsqrt) as base_calls:  # Qwen3RMSNorm's one rsqrt
        model(**batch)
    with Calls(torch.rsqrt) as calls:
        logits = lf.apply(model, params, batch).logits
    assert calls.count == base_calls.count == len(params.targets) == 4 * 2 + 1
    logits.sum().backward()
    with Calls(torch.rsqrt) as mixed_calls:
        rows = lf.apply(model, lf.stack([params, params]), batch, adapter_ids=[1] * len(batch["input_ids"])).logits
    assert mixed_calls.count == 2 * base_calls.count  # the output form: each norm run again on the leaves
    torch.testing.assert_close(rows, logits, rtol=0, atol=1e-5)
