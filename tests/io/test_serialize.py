"""Strict save/load (invariant 7): every kind of bad file is a clear error naming what is wrong."""

from __future__ import annotations

import json

import pytest
import torch
from components import tiny_config
from conftest import qwen3_batch, tiny_qwen3
from safetensors import safe_open
from safetensors.torch import save_file

import lora_func as lf
from lora_func._serialize import checksum
from lora_func.variants import REGISTRY

VARIANTS = sorted(REGISTRY)


def saved(tmp_path, name="lora", **fields):
    model = tiny_qwen3()
    cfg = tiny_config(name, r=4, **fields)
    kwargs = {"calibration_data": [qwen3_batch()]} if REGISTRY[name].calibrated else {}
    params = lf.init(model, cfg, seed=0, **kwargs)
    path = tmp_path / "adapter.safetensors"
    lf.save(params, path)
    return model, params, path


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def rewrite(path, tensors, metadata, *, seal=True):
    """Write an edited adapter; `seal` recomputes its checksum, so that what is tested is the check of the edit."""
    if seal and "sha256" in metadata:
        metadata = {**metadata, "sha256": checksum(metadata, tensors)}
    save_file(tensors, str(path), metadata=metadata)


def test_metadata_holds_format_variant_config_and_version(tmp_path):
    _, params, path = saved(tmp_path, use_rslora=True)
    metadata, tensors = read(path)
    assert metadata["format"] == "lora_func" and metadata["format_version"] == "2"
    assert metadata["sha256"] == checksum(metadata, tensors)
    assert metadata["variant"] == "lora" and metadata["library_version"] == lf.__version__
    assert json.loads(metadata["config"])["dtype"] == "float32"
    assert json.loads(metadata["config"])["use_rslora"] is True
    assert set(tensors) == {f"{p}.{k}" for p, k, _ in params.leaves()}


def test_load_without_model_and_bfloat16_round_trip(tmp_path):
    _, params, path = saved(tmp_path, dtype=torch.bfloat16)
    loaded = lf.load(path)
    assert loaded.config.dtype == torch.bfloat16
    for p, k, t in params.leaves():
        assert torch.equal(loaded[p][k], t.detach()) and loaded[p][k].dtype == torch.bfloat16


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"not a safetensors file at all, just text"])
def test_empty_or_garbage_file(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not a valid safetensors file"):
        lf.load(path)


def test_truncated_file(tmp_path):
    _, _, path = saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is not a valid safetensors file"):
        lf.load(path)


def test_safetensors_that_is_not_an_adapter(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="not a lora_func adapter"):
        lf.load(path)


def test_unknown_format_version_and_variant(tmp_path):
    _, _, path = saved(tmp_path)
    metadata, tensors = read(path)
    rewrite(path, tensors, {**metadata, "format_version": "99"})
    with pytest.raises(ValueError, match="format_version '99'"):
        lf.load(path)
    rewrite(path, tensors, {**metadata, "variant": "bogus"})
    with pytest.raises(ValueError, match="holds variant 'bogus'"):
        lf.load(path)


def test_config_of_another_variant(tmp_path):
    _, _, path = saved(tmp_path, "pissa")
    with pytest.raises(ValueError, match=r"holds PiSSAConfig\(.*expected LoRAConfig"):
        lf.load(path, config=lf.LoRAConfig)
    with pytest.raises(ValueError, match="expected LoRAConfig"):
        lf.load(path, config=lf.LoRAConfig(r=4))
    metadata, tensors = read(path)  # a LoRA header over PiSSA's fields
    rewrite(path, tensors, {**metadata, "variant": "lora"})
    with pytest.raises(ValueError, match=r"fields \['niter'\] that LoRAConfig does not know"):
        lf.load(path)


def test_bad_stored_config_field(tmp_path):
    _, _, path = saved(tmp_path)
    metadata, tensors = read(path)
    config = json.loads(metadata["config"])
    rewrite(path, tensors, {**metadata, "config": json.dumps({**config, "r": -2})})
    with pytest.raises(ValueError, match="stored config is invalid.*`r` must be a positive int"):
        lf.load(path)


@pytest.mark.parametrize("name", VARIANTS)
def test_missing_and_unexpected_keys(tmp_path, name):
    _, params, path = saved(tmp_path, name)
    metadata, tensors = read(path)
    key = next(iter(tensors))
    rest = {k: v for k, v in tensors.items() if k != key}
    rewrite(path, rest, metadata)
    with pytest.raises(ValueError, match=rf"missing keys \['{key}'\]"):
        lf.load(path)
    rewrite(path, {**tensors, "model.layers.0.self_attn.q_proj.extra": torch.zeros(1)}, metadata)
    with pytest.raises(ValueError, match=r"unexpected keys \['model.layers.0.self_attn.q_proj.extra'\]"):
        lf.load(path)


@pytest.mark.parametrize("name", VARIANTS)
def test_wrong_shape_and_dtype(tmp_path, name):
    _, params, path = saved(tmp_path, name)
    metadata, tensors = read(path)
    key = next(k for k, v in tensors.items() if v.dim() >= 1 and v.shape[-1] > 1)
    bad = dict(tensors)
    bad[key] = tensors[key][..., :-1].contiguous()
    rewrite(path, bad, metadata)
    with pytest.raises(ValueError, match=rf"key '{key}' has shape"):
        lf.load(path)
    bad[key] = tensors[key].double()
    rewrite(path, bad, metadata)
    with pytest.raises(ValueError, match=rf"key '{key}' has dtype torch.float64"):
        lf.load(path)


def test_model_that_lacks_a_target(tmp_path):
    _, _, path = saved(tmp_path)
    smaller = tiny_qwen3(num_hidden_layers=1)
    with pytest.raises(
        ValueError, match="target 'model.layers.1.self_attn.q_proj' is not a module of Qwen3ForCausalLM"
    ):
        lf.load(path, smaller)
    with pytest.raises(ValueError, match="target 'model.layers.1.self_attn.q_proj' is not a module"):
        lf.apply(smaller, lf.load(path), qwen3_batch())


def test_model_whose_target_has_another_shape(tmp_path):
    _, _, path = saved(tmp_path)
    wider = tiny_qwen3(intermediate_size=96)
    with pytest.raises(ValueError, match="'model.layers.0.mlp.gate_proj' is 64 -> 96 in the model"):
        lf.load(path, wider)


def test_save_refuses_non_params(tmp_path):
    with pytest.raises(TypeError, match="`params` must be lora_func Params"):
        lf.save({"a": {"A": torch.zeros(1)}}, tmp_path / "x.safetensors")


def test_save_refuses_leaves_whose_dtype_is_not_the_configs(tmp_path):
    _, params, _ = saved(tmp_path)
    path = params.targets[0].path
    entries = {p: dict(e) for p, e in params.items()}
    entries[path]["A"] = entries[path]["A"].double()
    with pytest.raises(ValueError, match=rf"leaf {path}.A has dtype torch.float64, the config says torch.float32"):
        lf.save(params.replace(entries), tmp_path / "bad.safetensors")
