"""PEFT exchange for the layer kinds, both ways, with PEFT itself loading what lora_func writes and lora_func
reading what PEFT's `save_pretrained` writes: transformers Conv1D (`fan_in_fan_out`), convolutions, embeddings
(PEFT's default save stores the base embedding), fused experts (`target_parameters`), `modules_to_save`, dropout."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from components import (
    classification_batch,
    cnn_batch,
    perturbed,
    qwen3_batch,
    tiny_bert_classifier,
    tiny_cnn,
    tiny_gpt2,
    tiny_qwen3,
    tiny_qwen3_moe,
)
from safetensors.torch import load_file, save_file

import lora_func as lf
from lora_func.variants import REGISTRY

peft = pytest.importorskip("peft")

EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about grouped convs, fan_in_fan_out and deprecated names
        return fn(*args, **kwargs)


def _call(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def _out(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def _both_ways(build, batch, params, tmp_path, atol=1e-5) -> tuple[float, float]:
    """lf -> PEFT: PEFT loads `to_peft`'s files and computes lora_func's output; PEFT -> lf: `from_peft` reads PEFT's
    own `save_pretrained` of that adapter and computes PEFT's output. Returns both max differences."""
    model = build()
    lf.to_peft(params, tmp_path / "lf", model=model)
    loaded = _quiet(peft.PeftModel.from_pretrained, build(), tmp_path / "lf")
    with torch.no_grad():
        expected = _out(lf.apply(model, params, batch))
        theirs = _out(_call(loaded, batch))
    torch.testing.assert_close(theirs, expected, rtol=0, atol=atol)
    _quiet(loaded.save_pretrained, tmp_path / "peft")  # PEFT's own file of the same adapter
    back = lf.from_peft(tmp_path / "peft", model)
    assert [t.path for t in back.targets] == [t.path for t in params.targets]
    with torch.no_grad():
        ours = _out(lf.apply(model, back, batch))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=atol)
    return (theirs - expected).abs().max().item(), (ours - theirs).abs().max().item()


def _config(tmp_path, name="lf") -> dict:
    return json.loads((tmp_path / name / "adapter_config.json").read_text())


@pytest.mark.parametrize("name", ["lora", "pissa", "dora", "ia3", "ia3ff", "vera"])
def test_conv1d_both_ways(name, tmp_path):
    cfg = REGISTRY[name].config(r=4, target_names=(r"c_fc$",) if name == "ia3ff" else None)
    params = perturbed(lf.init(tiny_gpt2(), cfg, seed=0))
    _both_ways(tiny_gpt2, qwen3_batch(), params, tmp_path)
    assert _config(tmp_path)["fan_in_fan_out"] is True


@pytest.mark.parametrize("name", ["lora", "dora", "ia3", "ia3ff"])
def test_conv_both_ways(name, tmp_path):
    targets = ("stem", "conv", "down", "pointwise") + (() if name == "dora" else ("mix",))
    cfg = REGISTRY[name].config(r=4, alpha=8, target_names=tuple(f"^{t}$" for t in targets))
    params = perturbed(lf.init(tiny_cnn(), cfg, seed=0), scale=0.2)
    _both_ways(tiny_cnn, cnn_batch(), params, tmp_path)


def test_conv_layers_peft_computes_otherwise_are_refused(tmp_path):
    params = lf.init(tiny_cnn(), lf.LoRAConfig(r=4, target_names=("^dilated$",)))
    with pytest.raises(ValueError, match=r"to_peft: 'dilated' \(Conv2d\) has dilation=\(2, 2\).*PEFT's conv A"):
        lf.to_peft(params, tmp_path)
    params = lf.init(torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3)), lf.IA3Config(target_names=("^0$",)))
    with pytest.raises(ValueError, match=r"to_peft: '0' is an nn.Conv1d, which PEFT's IA3 does not adapt"):
        lf.to_peft(params, tmp_path)
    params = lf.init(tiny_gpt2(), lf.HRAConfig(r=4))
    with pytest.raises(ValueError, match=r"conv1d target, and PEFT's HRA \(hra\) adapts linear layers only"):
        lf.to_peft(params, tmp_path)


def test_embedding_both_ways_and_peft_stored_base_embedding(tmp_path):
    cfg = lf.LoRAConfig(r=4, alpha=8, target_names=("embed_tokens$", "q_proj$"), exclude_names=())
    params = perturbed(lf.init(tiny_qwen3(), cfg, seed=0), scale=0.2)
    _both_ways(tiny_qwen3, qwen3_batch(), params, tmp_path)
    # PEFT's default save (above) stored the base embedding beside the adapter: read, as it is the model's own ...
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert key in tensors
    # ... and refused where it is not.
    tensors[key] = tensors[key] + 1
    save_file(tensors, tmp_path / "peft" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=rf"key '{key}' holds a base weight of 'model.embed_tokens'.*differs"):
        lf.from_peft(tmp_path / "peft", tiny_qwen3())


def test_experts_both_ways(tmp_path):
    cfg = lf.LoRAConfig(r=2, alpha=4, target_names=(r"q_proj$",), target_parameters=EXPERTS)
    params = perturbed(lf.init(tiny_qwen3_moe(), cfg, seed=0), scale=0.3)
    _both_ways(tiny_qwen3_moe, qwen3_batch(), params, tmp_path)
    written = _config(tmp_path)
    assert written["target_parameters"] == [t.path for t in params.targets if t.kind == "experts"]
    keys = load_file(tmp_path / "lf" / "adapter_model.safetensors")  # two parameters of one module nest, as in PEFT
    assert keys["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (8, 32)  # gate_up
    assert keys["base_model.model.model.layers.0.mlp.experts.lora_A.weight"].shape == (8, 16)  # down_proj


@pytest.mark.parametrize("name", ["lora", "ia3"])
def test_modules_to_save_both_ways(name, tmp_path):
    cfg = REGISTRY[name].config(r=2, target_names=(r"query$", r"value$"), modules_to_save=("classifier",))
    params = perturbed(lf.init(tiny_bert_classifier(), cfg, seed=0), scale=0.2)
    _both_ways(tiny_bert_classifier, classification_batch(), params, tmp_path)
    assert _config(tmp_path)["modules_to_save"] == ["classifier"]


def test_a_peft_seq_cls_checkpoint_with_its_head(tmp_path):
    """PEFT's SEQ_CLS task adds `classifier` and `score` to `modules_to_save`; the head that exists is read."""
    model = tiny_bert_classifier()
    peft_model = _quiet(
        peft.get_peft_model, copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")
    )
    with torch.no_grad():
        peft_model.get_base_model().classifier.modules_to_save["default"].weight.add_(0.5)
    peft_model.save_pretrained(tmp_path)
    params = lf.from_peft(tmp_path, model)
    assert params.config.modules_to_save == ("classifier",)
    with torch.no_grad():
        torch.testing.assert_close(
            lf.apply(model, params, classification_batch()).logits,
            peft_model(**classification_batch()).logits,
            rtol=0,
            atol=1e-6,
        )


def test_dropout_is_carried_both_ways(tmp_path):
    model = tiny_qwen3()
    params = lf.init(model, lf.LoRAConfig(r=2, dropout=0.25, target_names=(r"q_proj$",)), seed=0)
    lf.to_peft(params, tmp_path / "lf", model=model)
    assert _config(tmp_path)["lora_dropout"] == 0.25
    assert _quiet(peft.PeftConfig.from_pretrained, tmp_path / "lf").lora_dropout == 0.25
    assert lf.from_peft(tmp_path / "lf", model).config.dropout == 0.25


def test_an_adapter_mixing_conv1d_and_linear_targets_has_no_peft_config(tmp_path):
    model = tiny_gpt2()
    model.transformer.h[0].mlp.c_fc = torch.nn.Linear(32, 128)
    params = lf.init(model, lf.LoRAConfig(r=2, target_names=("c_fc$",)))
    with pytest.raises(ValueError, match=r"both transformers Conv1D and linear targets.*`fan_in_fan_out` is one flag"):
        lf.to_peft(params, tmp_path)
