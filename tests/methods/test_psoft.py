"""PSOFT against its definition (A, B the principal factors of W; R from q by an inverse, in float64) and against
PEFT's PSOFT given the same leaves: the frozen factors, outputs, gradients, and files both ways."""

from __future__ import annotations

import pytest
import torch
from components import qwen3_batch, tiny_qwen3
from peft_parity import (
    PROJECTIONS,
    assert_peft_files_round_trip,
    assert_same_as_peft,
    dequantized_twins,
    peft_layer,
    peft_twin,
    randomized,
)

import lora_func as lf

peft = pytest.importorskip("peft")

# lora_func fields; PEFT's names differ for two of them (`PEFT_NAMES`).
CASES = {
    "default": {},
    "pissa init, alpha 16": {"r": 8, "alpha": 16.0, "ab_svd_init": "pissa_init"},
    "neumann, bounded": {"r": 8, "use_cayley_neumann": True, "num_cayley_neumann_terms": 4, "cayley_neumann_eps": 0.5},
    "free R, no vectors": {"r": 8, "psoft_orth": False, "psoft_mag_a": False, "psoft_mag_b": False},
    "randomized svd": {"r": 8, "psoft_svd": "lowrank", "psoft_svd_lowrank_niter": 4, "random_seed": 3},
}
PEFT_NAMES = {"alpha": "psoft_alpha", "dropout": "psoft_dropout"}


def _peft_fields(fields):
    return {PEFT_NAMES.get(k, k): v for k, v in fields.items()}


def _peft_leaf(layer, leaf):
    return getattr(layer.psoft_R["default"], "weight" if leaf == "psoft_R" else leaf)


def _draw(path, leaf, tensor, gen):
    noise = 0.1 * torch.randn(tensor.shape, generator=gen)
    return noise if leaf == "psoft_R" and tensor.dim() == 1 else tensor + noise  # q; a free R or the vectors: near 1


def _transform(leaves, cfg):
    """R = diag(v_b) C diag(v_a) in float64: C = (I + Q)(I − Q)⁻¹ by an inverse, or Σ 2Qʲ by matrix powers."""
    q, r = leaves["psoft_R"].double(), cfg.r
    if cfg.psoft_orth:
        U = torch.zeros(r, r, dtype=torch.float64)
        U[tuple(torch.triu_indices(r, r, 1))] = q
        Q, eye = U - U.T, torch.eye(r, dtype=torch.float64)
        if cfg.use_cayley_neumann:
            norm = torch.linalg.matrix_norm(Q)
            Q = Q * cfg.cayley_neumann_eps / norm if cfg.cayley_neumann_eps and norm > cfg.cayley_neumann_eps else Q
            n = cfg.num_cayley_neumann_terms
            C = (
                eye
                + sum(2 * torch.linalg.matrix_power(Q, j) for j in range(1, n - 1))
                + torch.linalg.matrix_power(Q, n - 1)
            )
        else:
            C = (eye + Q) @ torch.linalg.inv(eye - Q)
    else:
        C = q
    ones = torch.ones(r, dtype=torch.float64)
    return leaves.get("vector_b", ones).double()[:, None] * C * leaves.get("vector_a", ones).double()[None, :]


@pytest.mark.parametrize("case", list(CASES))
def test_principal_factors_identity_at_init_and_the_dense_update(case):
    model = tiny_qwen3().eval()
    cfg = lf.PSOFTConfig(**CASES[case])
    params = lf.init(model, cfg, seed=0)
    batch = qwen3_batch()
    with torch.no_grad():
        assert torch.equal(lf.apply(model, params, batch).logits, model(**batch).logits)
    s = cfg.alpha / cfg.r
    for path, leaves in params.items():
        W = model.get_submodule(path).weight.double()
        A, B = leaves["A"].double(), leaves["B"].double()
        U, S, Vh = torch.linalg.svd(W)
        truncated = U[:, : cfg.r] @ torch.diag(S[: cfg.r]) @ Vh[: cfg.r]
        if cfg.psoft_svd == "full":  # (a randomized SVD with q = r only approximates it: PEFT's test below)
            torch.testing.assert_close(s * B @ A, truncated, rtol=1e-5, atol=1e-5)  # sign-free: the rank-r truncation
        if cfg.ab_svd_init == "psoft_init":
            torch.testing.assert_close(A @ A.T, torch.eye(cfg.r, dtype=torch.float64), rtol=0, atol=1e-5)
    params = randomized(params, _draw)
    for key, dw in lf.delta_weights(model, params).items():
        leaves = {k: v.detach() for k, v in params[key.removesuffix(".weight")].items()}
        eye = torch.eye(cfg.r, dtype=torch.float64)
        expected = s * leaves["B"].double() @ (_transform(leaves, cfg) - eye) @ leaves["A"].double()
        torch.testing.assert_close(dw.double(), expected, rtol=1e-5, atol=1e-6)
        assert expected.abs().max() > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft_factors_outputs_and_gradients(case):
    model, params, peft_model = peft_twin(
        lf.PSOFTConfig(**CASES[case], target_names=PROJECTIONS),
        peft.PsoftConfig(**_peft_fields(CASES[case]), target_modules=list(PROJECTIONS)),
        _draw,
        _peft_leaf,
    )
    assert len(params.targets) == sum(hasattr(m, "psoft_R") for m in peft_model.modules()) == 14
    for path, leaves in params.items():
        layer = peft_layer(peft_model, path)
        torch.testing.assert_close(leaves["A"], layer._psoft_A_cache["default"], rtol=0, atol=1e-6)
        torch.testing.assert_close(leaves["B"], layer._psoft_B_cache["default"], rtol=0, atol=1e-6)
    assert_same_as_peft(model, params, peft_model, _peft_leaf)


def test_matches_peft_on_the_dequantized_weights_of_a_4bit_base():
    """PEFT's PSOFT refuses a bitsandbytes base (its SVD needs a float weight); lora_func's takes the SVD of the
    dequantized weight, so it computes what PEFT computes on a float model holding those weights."""
    quantized, plain = dequantized_twins()
    model, params, peft_model = peft_twin(
        lf.PSOFTConfig(r=8, target_names=PROJECTIONS),
        peft.PsoftConfig(r=8, target_modules=list(PROJECTIONS)),
        _draw,
        _peft_leaf,
        model=quantized,
        twin=plain,
    )
    assert_same_as_peft(model, params, peft_model, _peft_leaf)


@pytest.mark.parametrize("case", ["default", "neumann, bounded", "free R, no vectors"])
def test_from_peft_of_a_trained_adapter_gives_peft_logits_and_to_peft_loads_in_peft(case, tmp_path):
    cfg = peft.PsoftConfig(**_peft_fields(CASES[case]), target_modules=["q_proj", "v_proj", "down_proj"])
    params = assert_peft_files_round_trip(tmp_path, cfg, "psoft_", 0.0, steps=3)
    want = lf.PSOFTConfig(**CASES[case])
    assert (params.config.r, params.config.alpha, params.config.psoft_orth) == (want.r, want.alpha, want.psoft_orth)
    assert params.config.use_cayley_neumann == want.use_cayley_neumann


def test_bad_fields_are_refused_by_name():
    with pytest.raises(ValueError, match="`ab_svd_init` must be one of"):
        lf.PSOFTConfig(ab_svd_init="olora")
    with pytest.raises(ValueError, match="`cayley_neumann_eps` must be in"):
        lf.PSOFTConfig(cayley_neumann_eps=1.5)
    with pytest.raises(ValueError, match=r"`r`=40 exceeds min\(d_in, d_out\)=32"):
        lf.init(tiny_qwen3(), lf.PSOFTConfig(r=40, target_names=("k_proj",)))
