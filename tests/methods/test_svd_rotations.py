"""SSVD and AntiPaSTO against their dense references (the papers' formulas on a full SVD), and the
structure they promise: orthogonal rotations, fixed left singular vectors, an untouched complement."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import qwen3_batch, tiny_qwen3, tiny_qwen3_4bit

import lora_func as lf
from lora_func.kinds.linear import dense_weight
from lora_func.variants import antipasto, ssvd

PATH = "model.layers.1.mlp.down_proj"  # 128 -> 64, not square


def randomized(params: lf.Params, scale: float = 0.3, seed: int = 0) -> lf.Params:
    gen = torch.Generator().manual_seed(seed)
    trainable, frozen = lf.split(params)
    moved = {
        p: {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in e.items()} for p, e in trainable.items()
    }
    return lf.combine(trainable.replace(moved), frozen)


def layer_output(model, params, path, x):
    """The adapted output of one layer on input `x`, through `lf.apply` on that layer alone."""
    target = next(t for t in params.targets if t.path == path)
    single = lf.Params({"": params[path]}, params.config, (dataclasses.replace(target, path=""),))
    with torch.no_grad():
        return lf.apply(model.get_submodule(path), single, x)


def inputs_of(model, path, batch):
    captured = {}
    handle = model.get_submodule(path).register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return captured["x"]


def skew_by_hand(upper: torch.Tensor, n: int) -> torch.Tensor:
    K = torch.zeros(n, n, dtype=upper.dtype)
    k = 0
    for i in range(n):
        for j in range(i + 1, n):
            K[i, j], K[j, i] = upper[k], -upper[k]
            k += 1
    return K


# -- SSVD ---------------------------------------------------------------------------------------


def ssvd_reference(W: torch.Tensor, r: int, delta: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """The paper's W' = U (Σ + ΔΣ) G Vᵀ on the full SVD: the top-r rows of Vᵀ rotated by G = Cayley(K)."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    K = skew_by_hand(upper.double(), r)
    eye = torch.eye(r, dtype=torch.float64)
    G = (eye - K) @ torch.linalg.inv(eye + K)
    S_hat, Vh_hat = S.clone(), Vh.clone()
    S_hat[:r] += delta.double()
    Vh_hat[:r] = G @ Vh[:r]
    return (U * S_hat) @ Vh_hat


@pytest.mark.parametrize("build", [tiny_qwen3, tiny_qwen3_4bit], ids=["float", "4bit"])
def test_ssvd_matches_the_dense_formula(build):
    model = build()
    params = randomized(lf.init(model, lf.SSVDConfig(r=6)))
    leaves = params[PATH]
    W = dense_weight(model.get_submodule(PATH))  # the dequantized weight on the 4-bit base
    expected = ssvd_reference(W, 6, leaves["delta_s"].detach(), leaves["K"].detach())

    merged = lf.merge(model, params)[f"{PATH}.weight"].detach()
    torch.testing.assert_close(merged.double(), expected, rtol=0, atol=5e-6)  # float32 leaves

    # The hook path: the layer's adapted output equals base output + (W' − W) x.
    x = inputs_of(model, PATH, qwen3_batch())
    with torch.no_grad():
        base = model.get_submodule(PATH)(x)
    got = layer_output(model, params, PATH, x)
    torch.testing.assert_close(got.double(), base.double() + x.double() @ (expected - W.double()).T, rtol=0, atol=5e-6)


def test_ssvd_rotation_is_orthogonal_and_keeps_left_singular_vectors():
    model = tiny_qwen3()
    params = randomized(lf.init(model, lf.SSVDConfig(r=8)), scale=1.0)
    leaves = {k: v.detach() for k, v in params[PATH].items()}
    G = ssvd.rotation(leaves)
    torch.testing.assert_close(G.T @ G, torch.eye(8), rtol=0, atol=1e-5)
    assert (G - torch.eye(8)).abs().max() > 0.1  # really a rotation, not the identity

    W = dense_weight(model.get_submodule(PATH)).double()
    W_new = lf.merge(model, params)[f"{PATH}.weight"].detach().double()
    U, S, _ = torch.linalg.svd(W, full_matrices=False)
    S_hat = S.clone()
    S_hat[:8] += leaves["delta_s"].double()
    # W' W'ᵀ = U diag(Σ̂²) Uᵀ: the left singular vectors are W's own, the values the shifted ones.
    torch.testing.assert_close(U.T @ W_new @ W_new.T @ U, torch.diag(S_hat**2), rtol=0, atol=1e-4)
    # Inputs outside the top-8 right singular subspace see the base weight.
    V_rest = torch.linalg.svd(W, full_matrices=True)[2][8:].T
    torch.testing.assert_close(W_new @ V_rest, W @ V_rest, rtol=0, atol=1e-4)  # float32 leaves


def test_ssvd_config_errors():
    with pytest.raises(ValueError, match="`r` must be >= 2"):
        lf.SSVDConfig(r=1)
    with pytest.raises(ValueError, match="`r`=65 exceeds"):
        lf.init(tiny_qwen3(), lf.SSVDConfig(r=65))
    with pytest.raises(ValueError, match="`alpha_pattern` must be empty"):
        lf.SSVDConfig(alpha_pattern={"q_proj": 2.0})
    # Per-target ranks do work: fewer rotated directions on the MLP.
    params = lf.init(tiny_qwen3(), lf.SSVDConfig(r=4, rank_pattern={"down_proj": 2}))
    assert params[PATH]["K"].shape == (1,) and params["model.layers.0.self_attn.q_proj"]["K"].shape == (6,)


# -- AntiPaSTO ----------------------------------------------------------------------------------


def antipasto_init(model, r=8, **kw):
    cfg = lf.AntiPaSTOConfig(r=r, **kw)
    return lf.init(model, cfg, calibration_data=[qwen3_batch(batch=4, seq=16)], progress=False)


def block_rotation_by_hand(theta: torch.Tensor, bs: int, alpha: float, max_angle: float | None) -> torch.Tensor:
    blocks = []
    for upper in theta.double():
        A = skew_by_hand(upper, bs)
        if max_angle is not None:
            limit = 2 * math.tan(max_angle / 2)
            A = limit * torch.tanh(A / limit)
        eye = torch.eye(bs, dtype=torch.float64)
        blocks.append(torch.linalg.inv(eye - alpha * A / 2) @ (eye + alpha * A / 2))
    return torch.block_diag(*blocks)


def test_antipasto_selects_directions_by_weight_times_activation():
    model = tiny_qwen3()
    params = antipasto_init(model)
    W = dense_weight(model.get_submodule(PATH)).double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    model.eval()
    X = inputs_of(model, PATH, qwen3_batch(batch=4, seq=16)).reshape(-1, 128).double()
    model.train()
    score = S * (X @ Vh.T).pow(2).mean(0).sqrt()
    index = score.topk(8).indices.sort().values
    assert not torch.equal(index, torch.arange(8))  # the data changed the choice from PiSSA's top-8
    leaves = params[PATH]
    torch.testing.assert_close(leaves["S"].double(), S[index], rtol=1e-5, atol=1e-6)
    overlap = (leaves["Vh"].double() @ Vh[index].T).diagonal().abs()  # same vectors up to sign
    torch.testing.assert_close(overlap, torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-4)


@pytest.mark.parametrize("build", [tiny_qwen3, tiny_qwen3_4bit], ids=["float", "4bit"])
@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.5])
def test_antipasto_matches_the_dense_formula(build, alpha):
    model = build()
    params = randomized(antipasto_init(model, alpha=alpha), scale=1.0)
    leaves = {k: v.detach() for k, v in params[PATH].items()}
    W = dense_weight(model.get_submodule(PATH)).double()
    U, S, Vh = (leaves[k].double() for k in ("U", "S", "Vh"))
    R = block_rotation_by_hand(leaves["theta"], 4, alpha, math.pi / 3)
    W_res = W - (U * S) @ Vh  # the paper's frozen residual
    expected = W_res + (U * (S + alpha * leaves["delta_s"].double())) @ R @ Vh

    merged = lf.merge(model, params)[f"{PATH}.weight"].detach()
    torch.testing.assert_close(merged.double(), expected, rtol=0, atol=1e-6)
    x = inputs_of(model, PATH, qwen3_batch())
    with torch.no_grad():
        base = model.get_submodule(PATH)(x)
    got = layer_output(model, params, PATH, x)
    torch.testing.assert_close(got.double(), base.double() + x.double() @ (expected - W).T, rtol=0, atol=1e-6)


def test_antipasto_rotation_structure_and_steering():
    model = tiny_qwen3()
    cfg = lf.AntiPaSTOConfig(r=8)
    params = randomized(antipasto_init(model), scale=3.0)
    leaves = {k: v.detach() for k, v in params[PATH].items()}
    R = antipasto.rotation(leaves["theta"], cfg)
    torch.testing.assert_close(R.T @ R, torch.eye(8), rtol=0, atol=1e-5)
    assert torch.equal(R[:4, 4:], torch.zeros(4, 4)) and torch.equal(R[4:, :4], torch.zeros(4, 4))
    # The soft clamp bounds the skew entries to ±2 tan(max/2): a 2×2 block turns by at most max_rotation_angle.
    pairs = lf.AntiPaSTOConfig(r=8, block_size=2, max_rotation_angle=0.4)
    angles = torch.linalg.eigvals(antipasto.rotation(torch.tensor([[-50.0], [0.1], [3.0], [50.0]]), pairs)).angle()
    assert angles.abs().max() <= 0.4 + 1e-6 and angles.abs().max() > 0.4 - 1e-3
    # Steering: α = −1 is the inverse rotation; α = 0 is the base model, exactly.
    R_back = antipasto.rotation(leaves["theta"], lf.AntiPaSTOConfig(r=8, alpha=-1.0))
    torch.testing.assert_close(R_back, R.T, rtol=0, atol=1e-6)
    off = params.__class__(dict(params.items()), lf.AntiPaSTOConfig(r=8, alpha=0.0), params.targets)
    batch = qwen3_batch()
    with torch.no_grad():
        assert torch.equal(lf.apply(model, off, batch).logits, model(**batch).logits)

    # The adapted weight keeps the selected left singular vectors and leaves the complement alone.
    W = dense_weight(model.get_submodule(PATH)).double()
    W_new = lf.merge(model, params)[f"{PATH}.weight"].detach().double()
    U, S, Vh = (leaves[k].double() for k in ("U", "S", "Vh"))
    principal = W_new - (W - (U * S) @ Vh)
    S_new = S + leaves["delta_s"].double()
    torch.testing.assert_close(U.T @ principal @ principal.T @ U, torch.diag(S_new**2), rtol=0, atol=1e-4)
    P_out = torch.eye(64, dtype=torch.float64) - U @ U.T
    torch.testing.assert_close(P_out @ W_new, P_out @ W, rtol=0, atol=1e-5)


def test_antipasto_config_errors():
    with pytest.raises(ValueError, match="`r`=6 must be a multiple of `block_size`=4"):
        lf.AntiPaSTOConfig(r=6)
    with pytest.raises(ValueError, match="`max_rotation_angle`"):
        lf.AntiPaSTOConfig(max_rotation_angle=4.0)
    with pytest.raises(ValueError, match="`block_size`"):
        lf.AntiPaSTOConfig(block_size=1)
