"""VeRA against its dense formula and against PEFT's VeRA; its shared projections through save/load and split."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft_parity import ALL_PROJECTIONS, PROJECTIONS, assert_same_as_peft, copy_into_peft, randomized, twins
from safetensors.torch import load_file, save_file
from torch import nn

import lora_func as lf
from lora_func._params import SHARED


def draw(path, leaf, value, gen):
    return value + 0.3 * torch.randn(value.shape, generator=gen)


def two_layer_model():
    """Two targets of different shapes, so that each uses its own slice of the shared projections."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 14))


def test_dense_reference_and_merge():
    model = two_layer_model()
    cfg = lf.VeRAConfig(r=3, d_initial=0.5)
    params = randomized(lf.init(model, cfg), draw)
    A, B = params[SHARED]["A"], params[SHARED]["B"]
    assert A.shape == (3, 12) and B.shape == (14, 3)
    merged = lf.merge(model, params)
    for i, (d_in, d_out) in enumerate([(12, 10), (10, 14)]):
        leaves, layer = params[str(i)], model[i]
        delta = torch.diag(leaves["lambda_b"]) @ B[:d_out] @ torch.diag(leaves["lambda_d"]) @ A[:, :d_in]
        W, b = layer.weight.detach() + delta.detach(), layer.bias.detach()
        x = torch.randn(4, 5, d_in)
        with torch.no_grad():
            torch.testing.assert_close(lf.apply(layer, _sub(params, i), x), x @ W.t() + b)
        torch.testing.assert_close(merged[f"{i}.weight"], W, rtol=1e-6, atol=1e-6)


def _sub(params, i):
    """The adapter of target `i` alone, addressed from inside that layer, with the shared projections."""
    from dataclasses import replace

    target = params.targets[i]
    entries = {"": params[target.path], SHARED: params[SHARED]}
    return lf.Params(entries, params.config, (replace(target, path=""),))


def test_init_values():
    model = two_layer_model()
    params = lf.init(model, lf.VeRAConfig(r=3, d_initial=0.25), seed=123)
    assert torch.equal(params["1"]["lambda_b"], torch.zeros(14))
    assert torch.equal(params["1"]["lambda_d"], torch.full((3,), 0.25))
    # The projections come from `projection_prng_key`, not from `seed`.
    other = lf.init(model, lf.VeRAConfig(r=3, d_initial=0.25), seed=7)
    assert torch.equal(params[SHARED]["A"], other[SHARED]["A"])
    keyed = lf.init(model, lf.VeRAConfig(r=3, projection_prng_key=1))
    assert not torch.equal(params[SHARED]["A"], keyed[SHARED]["A"])


def test_shared_leaves_are_frozen_stored_once_and_round_trip(tmp_path):
    model = two_layer_model()
    params = randomized(lf.init(model, lf.VeRAConfig(r=3)), draw)
    trainable, frozen = lf.split(params)
    assert set(frozen[SHARED]) == {"A", "B"} and not trainable[SHARED]
    assert all(not t.requires_grad for t in frozen[SHARED].values())
    assert lf.trainable_leaves(params) == [params[p][k] for p in ("0", "1") for k in ("lambda_b", "lambda_d")]
    assert lf.combine(trainable, frozen)[SHARED]["A"] is params[SHARED]["A"]

    path = tmp_path / "vera.safetensors"
    lf.save(params, path)
    keys = set(load_file(path))
    assert {k for k in keys if k.startswith(SHARED)} == {f"{SHARED}.A", f"{SHARED}.B"}
    loaded = lf.load(path, model)
    assert torch.equal(loaded[SHARED]["B"], params[SHARED]["B"]) and not loaded[SHARED]["B"].requires_grad

    # A file without its shared projection is refused, naming the key.
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    del tensors[f"{SHARED}.A"]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, broken, metadata=metadata)
    with pytest.raises(ValueError, match=r"missing keys \['<shared>\.A'\]"):
        lf.load(broken, model)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="`projection_prng_key`"):
        lf.VeRAConfig(projection_prng_key=-1)
    with pytest.raises(TypeError, match="`d_initial`"):
        lf.VeRAConfig(d_initial="0.1")
    with pytest.raises(ValueError, match="`rank_pattern` must be empty"):
        lf.VeRAConfig(rank_pattern={"q_proj": 2})


def _peft_vera(peft_layer, leaf):
    return {"lambda_b": peft_layer.vera_lambda_b["default"], "lambda_d": peft_layer.vera_lambda_d["default"]}[leaf]


@pytest.mark.parametrize("bits", [None, 4])
def test_matches_peft(bits):
    """Same shared projections from the same key (bitwise), same outputs and gradients for the same λ's."""
    from peft import VeraConfig, get_peft_model

    model, twin = twins(bits=bits) if bits else twins(attention_bias=True)
    cfg = lf.VeRAConfig(r=4, d_initial=0.3, projection_prng_key=7, target_names=ALL_PROJECTIONS)
    params = lf.init(model, cfg)
    peft_cfg = VeraConfig(r=4, d_initial=0.3, projection_prng_key=7, target_modules=list(PROJECTIONS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(twin, peft_cfg)
    assert torch.equal(params[SHARED]["A"], peft_model.base_model.vera_A["default"])  # (r, max d_in)
    assert torch.equal(params[SHARED]["B"], peft_model.base_model.vera_B["default"])  # (max d_out, r)
    for target in params.targets:
        layer = peft_model.get_base_model().get_submodule(target.path)
        assert torch.equal(params[target.path]["lambda_d"], layer.vera_lambda_d["default"].detach())
        assert torch.equal(params[target.path]["lambda_b"], layer.vera_lambda_b["default"].detach())

    params = randomized(params, draw)
    copy_into_peft(peft_model, params, _peft_vera)
    assert_same_as_peft(model, params, peft_model, _peft_vera)
