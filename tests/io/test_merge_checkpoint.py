"""Pure merge: the merged weights make an ordinary HF checkpoint; a non-finite merge is an error naming the module."""

from __future__ import annotations

import copy

import pytest
import torch
from components import tiny_config
from conftest import assert_untouched, perturbed, qwen3_batch, snapshot, tiny_qwen3

import lora_func as lf
from lora_func._variant import Intervention
from lora_func.variants import REGISTRY

# The variants with a weight form (ReFT edits hidden states: its merge is refused by name, tests/contract).
VARIANTS = sorted(n for n, v in REGISTRY.items() if v.capability(Intervention) is None)


def make(name, model):
    variant = REGISTRY[name]
    calibration = [qwen3_batch(seed=7)] if variant.calibrated else None
    return perturbed(lf.init(model, tiny_config(variant.name, r=4), seed=0, calibration_data=calibration))


@pytest.mark.parametrize("name", VARIANTS)
def test_merged_weights_save_as_an_hf_checkpoint(name, tmp_path):
    """Merged weights into a copy of the model, `save_pretrained`, reload: same logits as `lf.apply`."""
    from transformers import Qwen3ForCausalLM

    model = tiny_qwen3().eval()
    params = make(name, model)
    batch = qwen3_batch()
    before = snapshot(model)
    merged = {k: v.detach() for k, v in lf.merge(model, params).items()}
    merged_copy = copy.deepcopy(model)
    missing, unexpected = merged_copy.load_state_dict(merged, strict=False)
    assert not unexpected
    merged_copy.save_pretrained(tmp_path)
    reloaded = Qwen3ForCausalLM.from_pretrained(tmp_path).eval()
    assert_untouched(model, before)
    with torch.no_grad():
        expected = lf.apply(model, params, batch).logits
        got = reloaded(**batch).logits
        base = model(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, base, rtol=1e-4, atol=1e-5)  # the adapter is really in the checkpoint


@pytest.mark.parametrize("name", VARIANTS)
def test_merge_refuses_non_finite_weights_naming_the_module(name):
    model = tiny_qwen3()
    params = make(name, model)
    path = params.targets[min(1, len(params.targets) - 1)].path
    trainable, frozen = lf.split(params)
    entries = {p: dict(e) for p, e in trainable.items()}
    entries[path] = {k: torch.full_like(v, float("nan")) for k, v in entries[path].items()}
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"merge: the merged (weight|bias) of '{path}' has NaN or inf values"):
        lf.merge(model, lf.combine(trainable.replace(entries), frozen))
    assert_untouched(model, before)


def test_merge_refuses_inf():
    model = tiny_qwen3()
    params = perturbed(lf.init(model, lf.LoRAConfig(r=4), seed=0))
    path = params.targets[-1].path
    entries = {p: dict(e) for p, e in params.items()}
    entries[path]["B"] = entries[path]["B"].detach().clone()
    entries[path]["B"][0, 0] = float("inf")
    with pytest.raises(ValueError, match=rf"merge: the merged weight of '{path}' has NaN or inf values"):
        lf.merge(model, params.replace(entries))
