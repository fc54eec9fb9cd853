"""Offloaded bases: accelerate's `cpu_offload` and `dispatch_model` with a `device_map` that offloads.

Such a model keeps its weights on the meta device and loads each module's weights only inside that module's own
forward. lora_func reads base weights outside it (init's SVDs and norms, merge, DoRA's norm at the module's
output), so an offloaded target is refused by name, everywhere: before, `init` silently built leaves on meta,
`apply` failed with shape or device errors from inside torch, DoRA gave NaN logits. A device_map that keeps every
weight in memory is a plain model, and works as one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from components import perturbed, qwen3_batch, snapshot, tiny_config, tiny_qwen3

import lora_func as lf
from lora_func.variants import REGISTRY

accelerate = pytest.importorskip("accelerate")

VARIANTS = sorted(REGISTRY)
OFFLOADED = r"{caller}: Qwen3ForCausalLM is offloaded: its parameter '{name}' is on the meta device"
TARGET_ON_META = r"target 'model\.layers\.0\.self_attn\.q_proj' \(Linear\) has its weight on the meta device"


def make(name: str, model, batch) -> lf.Params:
    kwargs = {"calibration_data": [batch], "progress": False} if REGISTRY[name].calibrated else {}
    return perturbed(lf.init(model, tiny_config(name, r=4), seed=0, **kwargs), scale=0.1)


@pytest.mark.parametrize("name", VARIANTS)
def test_cpu_offload_is_refused_by_name_everywhere(name):
    plain, batch = tiny_qwen3(num_hidden_layers=1), qwen3_batch()
    params = make(name, plain, batch)  # an adapter made on the model in memory, as a resumed run has it
    model = accelerate.cpu_offload(copy.deepcopy(plain), execution_device="cpu")
    with torch.no_grad():
        base = model(**batch).logits
    before = snapshot(model)
    kwargs = {"calibration_data": [batch], "progress": False} if REGISTRY[name].calibrated else {}
    refused = OFFLOADED.replace("'{name}'", r"'model\.embed_tokens\.weight'")
    with pytest.raises(ValueError, match=refused.format(caller="init")):
        lf.init(model, tiny_config(name, r=4), seed=0, **kwargs)
    with pytest.raises(ValueError, match=refused.format(caller="apply")):
        lf.apply(model, params, batch)
    with pytest.raises(ValueError, match=refused.format(caller="merge")):
        lf.merge(model, params)
    with pytest.raises(ValueError, match=refused.format(caller="inject")):
        with lf.inject(model, params):
            pass
    with pytest.raises(ValueError, match=refused.format(caller="AdapterModule")):
        lf.AdapterModule(model, params)
    assert snapshot(model)["hooks"] == before["hooks"]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base)  # nothing left behind: the base runs as before


def test_device_map_with_disk_offload_names_the_offloaded_layer(tmp_path):
    model, batch = tiny_qwen3(num_hidden_layers=2), qwen3_batch()
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    model = accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    assert model.model.layers[1].self_attn.q_proj.weight.is_meta
    refused = OFFLOADED.replace("'{name}'", r"'model\.layers\.1\.self_attn\.q_proj\.weight'")
    with pytest.raises(ValueError, match=refused.format(caller="init")):
        lf.init(model, lf.DoRAConfig(r=4), seed=0)
    # Targets in memory only (layer 0) do not make it a plain model: the base's trainable parameters are.
    params = perturbed(lf.init(tiny_qwen3(num_hidden_layers=2), lf.LoRAConfig(r=4, layers=(0,)), seed=0))
    with pytest.raises(ValueError, match=refused.format(caller="apply")):
        lf.apply(model, params, batch)


def test_an_offloaded_submodule_is_refused_at_its_targets():
    """`cpu_offload` on one block (the root not hooked): its targets are refused by name."""
    model, batch = tiny_qwen3(num_hidden_layers=2), qwen3_batch()
    params = perturbed(lf.init(model, lf.LoRAConfig(r=4), seed=0))
    accelerate.cpu_offload(model.model.layers[0], execution_device="cpu")
    for call in (lambda: lf.init(model, lf.LoRAConfig(r=4)), lambda: lf.apply(model, params, batch)):
        with pytest.raises(ValueError, match=TARGET_ON_META + ".*offloaded"):
            call()


@pytest.mark.parametrize("name", ["lora", "dora", "ia3"])
def test_device_map_without_offload_is_a_plain_model(name):
    """Every weight in memory (a device_map onto "cpu" alone): outputs and gradients are the plain model's."""
    plain, batch = tiny_qwen3(num_hidden_layers=2), qwen3_batch()
    device_map = accelerate.infer_auto_device_map(plain, max_memory={"cpu": "1GiB"})
    assert set(device_map.values()) == {"cpu"}
    model = accelerate.dispatch_model(copy.deepcopy(plain), device_map=device_map)
    params = make(name, model, batch)
    leaves = [t for _, _, t in lf.split(params)[0].leaves()]
    out = lf.apply(model, params, batch)
    got = torch.autograd.grad(out.loss, leaves)
    want_out = lf.apply(plain, params, batch)
    want = torch.autograd.grad(want_out.loss, leaves)
    torch.testing.assert_close(out.logits, want_out.logits)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(lf.merge(model, params), lf.merge(plain, params))


def test_a_model_on_meta_lists_targets_and_refuses_init():
    """A model built on meta (to read its shapes): `lf.targets` is a dry run and works; `lf.init` refuses."""
    with torch.device("meta"):
        model = tiny_qwen3(num_hidden_layers=1)
    found = lf.targets(model, lf.LoRAConfig(r=4))
    assert found[0].path == "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match="init: " + TARGET_ON_META + ".*or was built on meta"):
        lf.init(model, lf.LoRAConfig(r=4))
