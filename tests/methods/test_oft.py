"""OFT (v2) against its formula (a dense block-diagonal rotation of the input, the Cayley transform's Neumann
series built with torch.linalg.matrix_power) and against PEFT's OFT given the same leaves: outputs, gradients,
and files both ways."""

from __future__ import annotations

import pytest
import torch
from components import qwen3_batch, tiny_qwen3
from peft_parity import PROJECTIONS, assert_peft_files_round_trip, assert_same_as_peft, peft_twin, randomized

import lora_func as lf

peft = pytest.importorskip("peft")

# lora_func fields, as PEFT's OFTConfig takes them (PEFT: r=0 with a block size, or a block size 0 with r).
CASES = {
    "default": {},
    "block 16, shared": {"oft_block_size": 16, "block_share": True},
    "exact Cayley": {"oft_block_size": 16, "use_cayley_neumann": False},
    "r blocks, 3 terms": {"oft_block_size": 0, "r": 4, "num_cayley_neumann_terms": 3},
}


def _peft_fields(fields):
    out = dict(fields)
    out.setdefault("r", 0)
    return out


def _peft_leaf(layer, leaf):
    return layer.oft_R["default"].weight


def _draw(path, leaf, tensor, gen):
    return 0.05 * torch.randn(tensor.shape, generator=gen)


def _series(Q, terms):
    """PEFT's truncated Cayley–Neumann series: I + 2 Σ_{j=1}^{m} Q^j + Q^(m+1), m = max(2, n − 2) for n >= 3
    (so n = 3 gives I + 2Q + 2Q² + Q³, as PEFT's `_cayley_batch` computes); I + 2Q for n = 2; I for n = 1."""
    eye = torch.eye(Q.shape[0], dtype=Q.dtype)
    if terms == 1:
        return eye
    if terms == 2:
        return eye + 2 * Q
    m = max(2, terms - 2)
    return eye + sum(2 * torch.linalg.matrix_power(Q, j) for j in range(1, m + 1)) + torch.linalg.matrix_power(Q, m + 1)


def _rotation(q, size, terms, neumann):
    """diag(R_i) from the definition: Q = U − Uᵀ, R the series above, or the Cayley transform (I − Q)(I + Q)⁻¹."""
    blocks = []
    for row in q.double():
        U = torch.zeros(size, size, dtype=torch.float64)
        U[tuple(torch.triu_indices(size, size, 1))] = row
        Q = U - U.T
        eye = torch.eye(size, dtype=torch.float64)
        blocks.append(_series(Q, terms) if neumann else (eye - Q) @ torch.linalg.inv(eye + Q))
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("case", list(CASES))
def test_dense_formula_and_identity_at_init(case):
    model = tiny_qwen3().eval()
    cfg = lf.OFTConfig(**CASES[case])
    params = lf.init(model, cfg, seed=0)
    batch = qwen3_batch()
    with torch.no_grad():
        assert torch.equal(lf.apply(model, params, batch).logits, model(**batch).logits)
    params = randomized(params, _draw)
    for path, dw in lf.delta_weights(model, params).items():
        module = model.get_submodule(path.removesuffix(".weight"))
        q = params[path.removesuffix(".weight")]["oft_R"].detach()
        count = module.in_features // (cfg.oft_block_size or module.in_features // cfg.r)
        size = module.in_features // count
        R = _rotation(
            q.expand(count, -1) if cfg.block_share else q, size, cfg.num_cayley_neumann_terms, cfg.use_cayley_neumann
        )
        W = module.weight.double()
        torch.testing.assert_close(dw.double(), W @ R.T - W, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft_outputs_and_gradients(case):
    model, params, peft_model = peft_twin(
        lf.OFTConfig(**CASES[case], target_names=PROJECTIONS),
        peft.OFTConfig(**_peft_fields(CASES[case]), target_modules=list(PROJECTIONS)),
        _draw,
        _peft_leaf,
    )
    assert len(params.targets) == sum(hasattr(m, "oft_R") for m in peft_model.modules()) == 14
    assert_same_as_peft(model, params, peft_model, _peft_leaf)


@pytest.mark.parametrize("case", ["default", "r blocks, 3 terms"])
def test_from_peft_gives_peft_logits_and_to_peft_loads_in_peft(case, tmp_path):
    cfg = peft.OFTConfig(**_peft_fields(CASES[case]), target_modules=["q_proj", "v_proj", "down_proj"])
    assert_peft_files_round_trip(tmp_path, cfg, "oft_R", 0.05)


def test_a_block_size_that_does_not_divide_d_in_is_moved_as_peft_moves_it():
    """Block size 24 on d_in 64 and 128: PEFT (with a warning) and lora_func both use 16, the nearest divisor."""
    with pytest.warns(UserWarning, match="Adjusted `oft_block_size`"):
        model, params, peft_model = peft_twin(
            lf.OFTConfig(oft_block_size=24, target_names=PROJECTIONS),
            peft.OFTConfig(oft_block_size=24, target_modules=list(PROJECTIONS)),
            _draw,
            _peft_leaf,
        )
    for path in params:
        assert params[path]["oft_R"].shape == _peft_leaf(peft_model.get_base_model().get_submodule(path), "").shape
    assert_same_as_peft(model, params, peft_model, _peft_leaf)
