"""LoRA, rsLoRA, PiSSA and DeLoRA against PEFT (same leaf values -> same outputs and gradients) and dense math."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import qwen3_batch, tiny_qwen3

import lora_func as lf

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomized(params, seed=0, scale=0.1):
    """Random values in every trainable leaf, so that parity is tested away from the identity."""
    gen = torch.Generator().manual_seed(seed)
    trainable, frozen = lf.split(params)
    moved = {
        p: {k: (scale * torch.randn(v.shape, generator=gen)).requires_grad_() for k, v in e.items()}
        for p, e in trainable.items()
    }
    return lf.combine(trainable.replace(moved), frozen)


def peft_layer(peft_model, path):
    return peft_model.base_model.model.get_submodule(path)


def assert_same_logits_and_grads(model, peft_model, params, peft_leaf, batch, atol=1e-5):
    """`peft_leaf(layer, leaf_name)` is the PEFT parameter holding our leaf's value."""
    for path, leaf, tensor in lf.split(params)[0].leaves():
        with torch.no_grad():
            peft_leaf(peft_layer(peft_model, path), leaf).copy_(tensor)
    ours = lf.apply(model, params, batch)
    theirs = peft_model(**batch)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=atol)
    ours.loss.backward()
    theirs.loss.backward()
    for path, leaf, tensor in lf.split(params)[0].leaves():
        ref = peft_leaf(peft_layer(peft_model, path), leaf).grad
        torch.testing.assert_close(tensor.grad, ref, rtol=1e-4, atol=1e-6, msg=f"{path}.{leaf}")


def lora_leaf(layer, leaf):
    return {"A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight}[leaf]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_matches_peft(use_rslora):
    from peft import LoraConfig, get_peft_model

    model = tiny_qwen3()
    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, lora_dropout=0.0, use_rslora=use_rslora),
    )
    params = randomized(lf.init(model, lf.LoRAConfig(r=4, alpha=8, use_rslora=use_rslora)))
    assert_same_logits_and_grads(model, peft_model, params, lora_leaf, qwen3_batch())


def test_lora_rank_and_alpha_patterns_match_peft():
    from peft import LoraConfig, get_peft_model

    model = tiny_qwen3()
    patterns = dict(rank_pattern={"q_proj": 8, "down_proj": 2}, alpha_pattern={"v_proj": 3.0})
    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, lora_dropout=0.0, **patterns)
    )
    params = randomized(lf.init(model, lf.LoRAConfig(r=4, alpha=8, **patterns)))
    assert params["model.layers.1.mlp.down_proj"]["B"].shape == (64, 2)
    assert_same_logits_and_grads(model, peft_model, params, lora_leaf, qwen3_batch())


def test_lora_equals_dense_reference():
    layer = torch.nn.Linear(16, 12)
    params = randomized(lf.init(layer, lf.LoRAConfig(r=3, alpha=6, exclude_names=())))
    x = torch.randn(5, 16)
    leaves = params[""]
    dense = layer.weight + 2.0 * leaves["B"] @ leaves["A"]
    torch.testing.assert_close(lf.apply(layer, params, x), x @ dense.T + layer.bias, rtol=1e-5, atol=1e-6)


def test_pissa_factors_match_peft_and_model_is_not_rewritten():
    from peft import LoraConfig, get_peft_model

    model = tiny_qwen3()
    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, lora_dropout=0.0, init_lora_weights="pissa"),
    )
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = lf.init(model, lf.PiSSAConfig(r=4, alpha=8))
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    for target in params.targets:
        layer = peft_layer(peft_model, target.path)
        torch.testing.assert_close(params[target.path]["A0"], layer.lora_A["default"].weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(params[target.path]["B0"], layer.lora_B["default"].weight, rtol=0, atol=1e-6)
    # PEFT subtracted s·B0 A0 from W; lora_func keeps W and the frozen factors. Same function either way:
    # W x + s(B A − B0 A0) x  =  (W − s B0 A0) x + s B A x.
    assert_same_logits_and_grads(model, peft_model, randomized(params), lora_leaf, qwen3_batch())


def test_pissa_fast_svd_approximates_the_truncated_svd():
    layer = torch.nn.Linear(64, 48)
    with torch.no_grad():  # a dominant top-4 subspace, which the randomized SVD must recover
        U, _, Vh = torch.linalg.svd(torch.randn(48, 64, generator=torch.Generator().manual_seed(0)))
        spectrum = torch.cat([torch.tensor([10.0, 8.0, 6.0, 4.0]), torch.logspace(-1, -3, 44)])
        layer.weight.copy_(U * spectrum @ Vh[:48])
    exact = lf.init(layer, lf.PiSSAConfig(r=4, alpha=8, exclude_names=()))[""]
    fast = lf.init(layer, lf.PiSSAConfig(r=4, alpha=8, niter=8, exclude_names=()), seed=0)[""]
    product = 2.0 * exact["B0"] @ exact["A0"]
    U, S, Vh = torch.linalg.svd(layer.weight.detach())
    torch.testing.assert_close(product, U[:, :4] * S[:4] @ Vh[:4], rtol=0, atol=1e-5)
    torch.testing.assert_close(2.0 * fast["B0"] @ fast["A0"], product, rtol=0, atol=1e-4)
    again = lf.init(layer, lf.PiSSAConfig(r=4, alpha=8, niter=8, exclude_names=()), seed=0)[""]
    assert torch.equal(again["A0"], fast["A0"])  # the seed makes the randomized SVD reproducible


def test_pissa_on_a_4bit_base_uses_the_dequantized_weight():
    from conftest import tiny_qwen3_4bit

    from lora_func.kinds.linear import dense_weight

    model = tiny_qwen3_4bit()
    params = lf.init(model, lf.PiSSAConfig(r=4, alpha=4))
    target = params.targets[0]
    W = dense_weight(model.get_submodule(target.path))
    U, S, Vh = torch.linalg.svd(W)
    leaves = params[target.path]
    torch.testing.assert_close(leaves["B0"] @ leaves["A0"], U[:, :4] * S[:4] @ Vh[:4], rtol=0, atol=1e-5)


def delora_leaf(layer, leaf):
    return {
        "A": layer.delora_A["default"],
        "B": layer.delora_B["default"],
        "lambda": layer.delora_lambda["default"],
    }[leaf]


def test_delora_matches_peft():
    from peft import DeloraConfig, get_peft_model

    model = tiny_qwen3()
    peft_model = get_peft_model(
        copy.deepcopy(model), DeloraConfig(r=4, delora_lambda=15, target_modules=PROJECTIONS, module_dropout=0.0)
    )
    params = lf.init(model, lf.DeLoRAConfig(r=4, alpha=15))
    for target in params.targets:
        stored = peft_layer(peft_model, target.path).delora_w_norm["default"]
        torch.testing.assert_close(params[target.path]["w_norm"], stored, rtol=0, atol=0)
    assert_same_logits_and_grads(model, peft_model, randomized(params, scale=0.5), delora_leaf, qwen3_batch())


def test_delora_equals_dense_reference():
    layer = torch.nn.Linear(16, 12)
    params = randomized(lf.init(layer, lf.DeLoRAConfig(r=3, alpha=2.0, exclude_names=())), scale=0.5)
    leaves = params[""]
    A, B, lam = leaves["A"], leaves["B"], leaves["lambda"]
    w_norm = layer.weight.detach().norm(dim=0)
    middle = torch.diag(lam / 3 / (A.norm(dim=1) * B.norm(dim=0)))
    dense = layer.weight + (B @ middle @ A) * w_norm[None, :]
    x = torch.randn(5, 16)
    torch.testing.assert_close(lf.apply(layer, params, x), x @ dense.T + layer.bias, rtol=1e-5, atol=1e-6)
