"""OFT (v2) against its formula (a dense block-diagonal rotation of the input, the Cayley transform's Neumann
series built with torch.linalg.matrix_power) and against PEFT's OFT given the same leaves: outputs, gradients,
and files both ways; on nn.Conv2d, the kernel's fan-in rotated (PEFT's Conv2d: its unmerged forward on 1×1
kernels, its merge on any)."""

from __future__ import annotations

import pytest
import torch
from components import cnn_batch, qwen3_batch, tiny_cnn, tiny_qwen3
from peft_parity import (
    PROJECTIONS,
    assert_convolutions_match_peft,
    assert_peft_files_round_trip,
    assert_same_as_peft,
    peft_twin,
    randomized,
)

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


@pytest.mark.parametrize("fields", [{"oft_block_size": 4}, {"oft_block_size": 0, "r": 2, "block_share": True}])
def test_a_1x1_convolution_matches_peft_outputs_gradients_and_files(fields, tmp_path):
    """`pointwise` (16 -> 16, 1×1): PEFT's unmerged Conv2d computes the rotated kernel there."""
    cfg = lf.OFTConfig(**fields, target_names=("^pointwise$",))
    peft_config = peft.OFTConfig(**_peft_fields(fields), target_modules=["pointwise"])
    worst = assert_convolutions_match_peft(tmp_path, cfg, peft_config, _draw, _peft_leaf)
    assert worst["outputs"] <= 1e-5 and worst["grad"] <= 1e-5, worst


def test_convolutions_equal_peft_merged_and_the_dense_rotated_kernel():
    """3×3 convolutions, strided and with fan-in 27 (block size 8 moved to 9, as PEFT moves it): lora_func's forward,
    its merge, PEFT's merged model and the kernel W Rᵀ built densely in float64 agree; gradients equal those of the
    dense kernel's convolution."""
    convs = ["stem", "conv", "down", "pointwise"]
    with pytest.warns(UserWarning, match="Adjusted `oft_block_size`"):
        model, params, peft_model = peft_twin(
            lf.OFTConfig(oft_block_size=8, target_names=tuple(f"^{c}$" for c in convs)),
            peft.OFTConfig(r=0, oft_block_size=8, target_modules=convs),
            _draw,
            _peft_leaf,
            model=tiny_cnn().eval(),
            twin=tiny_cnn().eval(),
        )
    assert params["stem"]["oft_R"].shape == (3, 36)  # fan-in 27: 3 blocks of 9
    x = cnn_batch()
    out = lf.apply(model, params, x)
    assert (out - model(x)).abs().max() > 1e-2
    with torch.no_grad():
        merged = torch.func.functional_call(model, lf.merge(model, params), (x,))
        peft_model.merge_adapter()
        peft_merged = peft_model(x)
    torch.testing.assert_close(merged, out, rtol=0, atol=1e-5)
    torch.testing.assert_close(peft_merged, out, rtol=0, atol=1e-5)

    leaves = {p: params[p]["oft_R"] for p in params}
    dense_leaves = {p: q.detach().double().requires_grad_() for p, q in leaves.items()}
    kernels = {}
    for path, q in dense_leaves.items():
        conv = model.get_submodule(path)
        n = conv.weight[0].numel()
        size = n // q.shape[0]
        R = _rotation_differentiable(q, size)
        kernels[f"{path}.weight"] = (conv.weight.double().flatten(1) @ R.T).reshape(conv.weight.shape)
    state = {k: v.double() for k, v in model.state_dict().items()} | kernels
    dense = torch.func.functional_call(model.double(), state, (x.double(),))
    model.float()
    torch.testing.assert_close(dense.float(), out.detach(), rtol=0, atol=1e-5)
    out.square().mean().backward()
    dense.square().mean().backward()
    for path in leaves:
        torch.testing.assert_close(leaves[path].grad.double(), dense_leaves[path].grad, rtol=1e-4, atol=1e-6)


def _rotation_differentiable(q, size, terms=5):
    """diag(R_i) from the definition (`_series`), differentiable in q."""
    rows, cols = torch.triu_indices(size, size, 1)
    blocks = []
    for row in q:
        U = torch.zeros(size, size, dtype=q.dtype).index_put((rows, cols), row)
        blocks.append(_series(U - U.T, terms))
    return torch.block_diag(*blocks)


def test_merge_equals_the_unmerged_forward_on_every_convolution():
    """Grouped, "same"-padded and dilated, reflect-padded convolutions too (PEFT has no layer computing them)."""
    model = tiny_cnn().eval()
    cfg = lf.OFTConfig(oft_block_size=4, target_names=(r"^(conv|mix|dilated|pointwise)$",))
    params = randomized(lf.init(model, cfg, seed=0), _draw)
    assert params["mix"]["oft_R"].shape == (9, 6)  # fan-in 8 / 2 groups · 9 = 36
    x = cnn_batch()
    with torch.no_grad():
        expected = lf.apply(model, params, x)
        merged = torch.func.functional_call(model, lf.merge(model, params), (x,))
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert (expected - model(x)).abs().max() > 1e-2


@pytest.mark.parametrize("conv", ["stem", "mix"])
def test_convolutions_peft_computes_otherwise_are_refused_both_ways(conv, tmp_path):
    model = tiny_cnn()
    params = lf.init(model, lf.OFTConfig(oft_block_size=4, target_names=(f"^{conv}$",)))
    for given in ({"model": model}, {}):
        with pytest.raises(ValueError, match=rf"to_peft: '{conv}' \(Conv2d\) has kernel_size=\(3, 3\).*PEFT's OFT"):
            lf.to_peft(params, tmp_path / "out", **given)
    assert not (tmp_path / "out").exists()
    if conv == "stem":  # PEFT writes a 3×3 OFT Conv2d adapter; lora_func will not read it
        peft.get_peft_model(tiny_cnn(), peft.OFTConfig(r=0, oft_block_size=3, target_modules=["stem"])).save_pretrained(
            tmp_path / "peft"
        )
        with pytest.raises(ValueError, match=r"'stem' \(Conv2d\) has kernel_size=\(3, 3\)"):
            lf.from_peft(tmp_path / "peft", tiny_cnn())


def test_one_adapter_of_both_forms_in_mixed_rows_and_stacked():
    """The linear head takes the input form, the convolutions the output form, in one injection: per-row adapters
    (`adapter_ids`) and `vmap` over stacked adapters give each adapter's own outputs."""
    model = tiny_cnn().eval()
    cfg = lf.OFTConfig(oft_block_size=4, target_names=(r"^(stem|down|pointwise|head)$",))
    adapters = [
        randomized(lf.init(model, cfg), lambda p, k, t, gen, s=scale: s * _draw(p, k, t, gen)) for scale in (1, -2)
    ]
    x = cnn_batch(batch=4)
    ids = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        outs = [lf.apply(model, p, x) for p in adapters]
        assert (outs[0] - outs[1]).abs().max() > 1e-3
        mixed = lf.apply(model, lf.stack(adapters), x, adapter_ids=ids)
        stacked = torch.func.vmap(lambda p: lf.apply(model, p, x))(lf.stack(adapters))
    torch.testing.assert_close(mixed, torch.stack([outs[i][row] for row, i in enumerate(ids.tolist())]))
    torch.testing.assert_close(stacked, torch.stack(outs))
