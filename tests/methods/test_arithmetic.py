"""Adapter arithmetic against dense references: ΔW = merged − base, Σ w_i ΔW_i, the truncated SVD, PEFT's dense
merge utilities (`peft.utils.merge_utils`), and the model run with base + ΔW."""

from __future__ import annotations

import dataclasses
import math
import re

import optree
import pytest
import torch
from components import tiny_config
from conftest import assert_untouched, perturbed, qwen3_batch, snapshot, tiny_qwen3, tiny_qwen3_4bit
from torch import nn

import lora_func as lf
from lora_func._arithmetic import target_seed
from lora_func._variant import Intervention
from lora_func.kinds.linear import dense_weight
from lora_func.variants import REGISTRY

merge_utils = pytest.importorskip("peft.utils.merge_utils")

VARIANTS = sorted(REGISTRY)
ATOL = 1e-5  # ΔW entries are O(0.01–1); float32 products and SVD reconstruction: measured <= 3.4e-6


def make(name, model, seed=0, **fields):
    variant = REGISTRY[name]
    calibration = [qwen3_batch(seed=7)] if variant.calibrated else None
    cfg = tiny_config(name, **{"r": 4, **fields})
    return perturbed(lf.init(model, cfg, seed=seed, calibration_data=calibration, progress=False), seed=seed + 3)


@pytest.fixture(scope="module")
def qwen3_4bit():
    return tiny_qwen3_4bit().eval()


def leaves_of(params):
    return {(path, leaf): t.detach().clone() for path, leaf, t in params.leaves()}


def assert_leaves_unchanged(params, before):
    assert leaves_of(params).keys() == before.keys()
    for key, t in leaves_of(params).items():
        assert torch.equal(t, before[key]), f"input leaf {key} changed"


def base_weights(model):
    return {f"{n}.weight": dense_weight(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def dense_sum(model, adapters, weights):
    """Σ_i w_i ΔW_i over the union of targets, from `delta_weights` (a missing target counts as 0)."""
    total = {}
    for p, w in zip(adapters, weights):
        for key, dw in lf.delta_weights(model, p).items():
            total[key] = total.get(key, 0) + w * dw
    return total


def max_diff(got, want):
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    return max((got[k] - want[k]).abs().max().item() for k in got)


def logits(model, params, batch):
    with torch.no_grad():
        return lf.apply(model, params, batch).logits


# -- delta_weights: merged − base, for every variant ---------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_delta_weights_are_merged_minus_base(name):
    """Same keys as `lf.merge` (biases too, where IA3 / ROAD scale them); values merged − base."""
    model = tiny_qwen3(attention_bias=True).eval()
    params = make(name, model)
    before, leaves = snapshot(model), leaves_of(params)
    if REGISTRY[name].capability(Intervention) is not None:  # ReFT edits hidden states: no ΔW, said by name
        with pytest.raises(ValueError, match=rf"delta_weights: target {params.targets[0].path!r}"):
            lf.delta_weights(model, params)
        assert_untouched(model, before)
        return
    delta = lf.delta_weights(model, params)
    assert_untouched(model, before)
    assert_leaves_unchanged(params, leaves)
    merged = {k: v.detach() for k, v in lf.merge(model, params).items()}
    state = model.state_dict()
    assert delta.keys() == merged.keys()
    assert all(v.dtype == torch.float32 for v in delta.values())
    torch.testing.assert_close({k: state[k] + delta[k] for k in delta}, merged, rtol=0, atol=ATOL)
    assert max(v.abs().max().item() for v in delta.values()) > 100 * ATOL  # the adapter is not the identity


@pytest.mark.parametrize("name", VARIANTS)
def test_delta_weights_on_a_4bit_base_use_the_dequantized_weight(name, qwen3_4bit):
    if "linear" not in REGISTRY[name].kinds:
        pytest.skip(f"{name} adapts no linear layer, so no 4-bit one")
    params = make(name, qwen3_4bit)
    before = snapshot(qwen3_4bit)
    delta = lf.delta_weights(qwen3_4bit, params)
    assert_untouched(qwen3_4bit, before)
    merged = lf.merge(qwen3_4bit, params)  # bnb: dequantized, float32
    dense = {f"{t.path}.weight": dense_weight(qwen3_4bit.get_submodule(t.path)) for t in params.targets}
    torch.testing.assert_close({k: dense[k] + delta[k] for k in delta}, merged, rtol=0, atol=ATOL)


def test_delta_weights_are_differentiable():
    """A penalty on ‖ΔW‖² trains through the factors: its gradient is 2 s ΔW Aᵀ on B."""
    model = tiny_qwen3()
    params = make("lora", model)
    path = params.targets[0].path
    penalty = sum((dw**2).sum() for dw in lf.delta_weights(model, params).values())
    penalty.backward()
    B, A = params[path]["B"], params[path]["A"]
    s = params.config.alpha / params.config.r
    torch.testing.assert_close(B.grad, 2 * s * (s * B @ A) @ A.T, rtol=1e-5, atol=1e-6)


# -- weighted_sum: exact, by concatenated factors -------------------------------------------------------------------

# The methods the docs promise an exact sum for (factors concatenated), and those that need the base weight for it.
EXACT_SUM = {"lora", "pissa", "eva", "vera", "delora", "ssvd", "antipasto", "hra"}
SUM_READS_WEIGHT = {"hra"}  # ΔW = −W B A


@pytest.mark.parametrize("name", VARIANTS)
def test_weighted_sum_is_exact_or_refused_by_name(name):
    """Either the sum's ΔW is Σ wᵢ ΔWᵢ, or the method is refused by name, and then its ΔW is indeed no low-rank
    product: of rank above the sum of the adapters' ranks on some target."""
    model = tiny_qwen3().eval()
    a, b = make(name, model, seed=0), make(name, model, seed=1)
    weights = [0.7, -1.3]
    if "linear" not in REGISTRY[name].kinds:  # LN Tuning: sums are LoRAs of linear layers
        with pytest.raises(ValueError, match=r"adapter arithmetic covers nn.Linear-style targets only"):
            lf.weighted_sum([a, b], weights)
        return
    try:
        lf.weighted_sum([a, b], weights)
    except ValueError as refused:
        reads_weight = "reads the base weight" in str(refused)
        if not reads_weight:
            assert re.search(rf"`adapters\[0\]` \({type(a.config).__name__}\).*lf.magnitude_prune", str(refused))
            assert name not in EXACT_SUM
            ranks = [torch.linalg.matrix_rank(dw).item() for dw in dense_sum(model, [a, b], weights).values()]
            assert max(ranks) > a.config.r + b.config.r
            return
        assert re.search(r"reads the base weight.*`model=`", str(refused))
    else:
        reads_weight = False
    assert reads_weight == (name in SUM_READS_WEIGHT)
    before, leaves = snapshot(model), leaves_of(a)
    result = lf.weighted_sum([a, b], weights, model=model if reads_weight else None)
    assert_untouched(model, before)
    assert_leaves_unchanged(a, leaves)
    assert type(result.config) is lf.LoRAConfig
    assert max_diff(lf.delta_weights(model, result), dense_sum(model, [a, b], weights)) < ATOL


def test_the_documented_exact_sums_are_registered():
    assert EXACT_SUM <= set(REGISTRY)


def test_weighted_sum_of_different_ranks_scales_and_targets(tmp_path):
    """LoRA r=4 on q, v; rsLoRA r=8 with a rank and an alpha pattern on v, o, up; PiSSA r=2 on q, down: the union
    of targets, per-target ranks summed, weights negative too; the result applies, saves, loads and merges."""
    model = tiny_qwen3().eval()
    a = make("lora", model, target_names=(r"q_proj$", r"v_proj$"))
    b = make(
        "lora",
        model,
        seed=1,
        r=8,
        alpha=4.0,
        use_rslora=True,
        target_names=(r"v_proj$", r"o_proj$", r"up_proj$"),
        rank_pattern={r"layers\.1\.mlp\.up_proj": 2},
        alpha_pattern={r"o_proj": 32.0},
    )
    c = make("pissa", model, seed=2, r=2, target_names=(r"q_proj$", r"down_proj$"))
    weights = [0.5, -1.0, 2.0]
    result = lf.weighted_sum([a, b, c], weights)
    want = dense_sum(model, [a, b, c], weights)
    assert max_diff(lf.delta_weights(model, result), want) < ATOL

    ranks = {t.path: result[t.path]["A"].shape[0] for t in result.targets}
    assert ranks["model.layers.0.self_attn.q_proj"] == 4 + 2 * 2  # LoRA's 4 + PiSSA's 2r
    assert ranks["model.layers.0.self_attn.v_proj"] == 4 + 8
    assert ranks["model.layers.1.mlp.up_proj"] == 2
    assert ranks["model.layers.0.mlp.down_proj"] == 4
    assert len(result.targets) == 2 * 5  # q, v, o, up, down in both layers
    assert result.config.rank_pattern  # the ranks differ per target

    # apply == functional_call with base + ΔW; merge, save/load accept it.
    batch = qwen3_batch()
    state = base_weights(model)
    with torch.no_grad():
        reference = torch.func.functional_call(model, {k: state[k] + v for k, v in want.items()}, (batch["input_ids"],))
    torch.testing.assert_close(logits(model, result, batch), reference.logits, rtol=0, atol=1e-5)
    merged = lf.merge(model, result)
    torch.testing.assert_close({k: v.detach() for k, v in merged.items()}, {k: state[k] + want[k] for k in want})
    lf.save(result, tmp_path / "sum.safetensors")
    loaded = lf.load(tmp_path / "sum.safetensors", model)
    assert loaded.config == result.config and loaded.targets == result.targets
    assert torch.equal(logits(model, loaded, batch), logits(model, result, batch))


def test_averaging_factors_is_wrong_and_weighted_sum_is_exact():
    """½(A₁+A₂), ½(B₁+B₂) is ¼(B₁+B₂)(A₁+A₂): cross terms; concatenation is exact."""
    model = tiny_qwen3()
    a, b = make("lora", model, seed=0), make("lora", model, seed=1)
    want = dense_sum(model, [a, b], [0.5, 0.5])
    naive = optree.tree_map(lambda x, y: 0.5 * x + 0.5 * y, a, b)
    with torch.no_grad():
        got_naive = lf.delta_weights(model, naive)
        got = lf.delta_weights(model, lf.weighted_sum([a, b], [0.5, 0.5]))

    def relative(got):
        return math.sqrt(sum(((got[k] - want[k]) ** 2).sum() for k in want) / sum((want[k] ** 2).sum() for k in want))

    assert relative(got_naive) > 0.5
    assert relative(got) < 1e-6


def test_weighted_sum_beyond_full_rank_refactors_exactly():
    """20 adapters of rank 4 on 64-wide layers: 80 > 64 columns are re-factored at rank 64, still exact."""
    model = tiny_qwen3()
    adapters = [make("lora", model, seed=s, target_names=(r"q_proj$",)) for s in range(20)]
    weights = [(-1) ** s / (s + 1) for s in range(20)]
    result = lf.weighted_sum(adapters, weights)
    assert {result[t.path]["A"].shape[0] for t in result.targets} == {64}
    assert max_diff(lf.delta_weights(model, result), dense_sum(model, adapters, weights)) < ATOL


def test_weighted_sum_on_a_4bit_base(qwen3_4bit):
    params = make("lora", qwen3_4bit)
    batch = qwen3_batch()
    same = lf.weighted_sum([params], [1.0])
    torch.testing.assert_close(logits(qwen3_4bit, same, batch), logits(qwen3_4bit, params, batch), rtol=0, atol=1e-5)


def test_to_peft_of_a_weighted_sum_loads_in_peft_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_qwen3().eval()
    a = make("lora", model, target_names=(r"q_proj$", r"v_proj$"))
    b = make("lora", model, seed=1, r=8, use_rslora=True, target_names=(r"v_proj$", r"down_proj$"))
    result = lf.weighted_sum([a, b], [1.0, -0.5])
    assert result.config.rank_pattern
    lf.to_peft(result, tmp_path, model=model)
    batch = qwen3_batch()
    peft_model = peft.PeftModel.from_pretrained(tiny_qwen3().eval(), tmp_path)
    with torch.no_grad():
        theirs = peft_model(**batch).logits
        base = model(**batch).logits
    ours = logits(model, result, batch)
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


# -- resize: the truncated SVD -------------------------------------------------------------------------------------


def test_resize_error_is_the_dropped_singular_values():
    """Eckart–Young: ‖ΔW − ΔW_r‖_F equals the norm of the dropped singular values, target by target."""
    model = tiny_qwen3()
    params = make("lora", model, r=16, rank_pattern={r"layers\.1\.self_attn\.q_proj": 2})
    delta = lf.delta_weights(model, params)
    before = leaves_of(params)
    small = lf.resize(params, 4)
    assert_leaves_unchanged(params, before)
    got = lf.delta_weights(model, small)
    for target in params.targets:
        key = f"{target.path}.weight"
        S = torch.linalg.svdvals(delta[key].double())
        r = min(4, params[target.path]["A"].shape[0])
        assert small[target.path]["A"].shape == (r, target.d_in)
        error = torch.linalg.matrix_norm((got[key] - delta[key]).double())
        assert abs(error - S[r:].norm()) <= 1e-5 * S.norm(), key
    exact = lf.resize(params, 16)
    assert max_diff(lf.delta_weights(model, exact), delta) < ATOL
    assert exact["model.layers.1.self_attn.q_proj"]["A"].shape[0] == 2  # rank 2 kept: no zero padding


def test_resize_rank_pattern_and_dense_variants():
    """A DoRA adapter (dense ΔW, read from the model) to per-target ranks: each the truncated SVD of its ΔW."""
    model = tiny_qwen3()
    params = make("dora", model)
    with pytest.raises(ValueError, match=r"resize: `params` \(DoRAConfig\) has a ΔW that is W' − W.*`model=`"):
        lf.resize(params, 8)
    result = lf.resize(params, 8, rank_pattern={"v_proj": 3}, model=model)
    delta = lf.delta_weights(model, params)
    got = lf.delta_weights(model, result)
    for target in params.targets:
        key = f"{target.path}.weight"
        r = 3 if key.endswith("v_proj.weight") else 8
        U, S, Vh = torch.linalg.svd(delta[key].double(), full_matrices=False)
        reference = (U[:, :r] * S[:r]) @ Vh[:r]
        assert (got[key] - reference).abs().max() < ATOL, key
        assert result[target.path]["A"].shape[0] == r
    assert dict(result.config.rank_pattern).keys() == {
        f"^{t.path.replace('.', chr(92) + '.')}$" for t in params.targets if t.path.endswith("v_proj")
    }


# -- TIES, DARE, magnitude pruning: PEFT's dense utilities ---------------------------------------------------------


@pytest.fixture(scope="module")
def three():
    """A LoRA, an rsLoRA on partly other targets, and a DoRA (dense ΔW), on one model."""
    model = tiny_qwen3().eval()
    adapters = [
        make("lora", model, target_names=(r"q_proj$", r"v_proj$", r"up_proj$")),
        make("lora", model, seed=1, r=8, use_rslora=True, target_names=(r"v_proj$", r"o_proj$")),
        make("dora", model, seed=2, target_names=(r"q_proj$", r"o_proj$", r"up_proj$")),
    ]
    return model, adapters, [1.0, 0.6, -0.8]


@torch.no_grad()
def task_tensors(model, adapters, key):
    zero = torch.zeros_like(base_weights(model)[key])
    return [lf.delta_weights(model, p).get(key, zero) for p in adapters]


def peft_reference(method, model, adapters, weights, key, density, seed=None):
    tasks, w = task_tensors(model, adapters, key), torch.tensor(weights)
    if method == "ties":
        return merge_utils.ties(tasks, w, density)
    if method == "magnitude_prune":
        return merge_utils.magnitude_prune(tasks, w, density)
    torch.manual_seed(target_seed(seed, key.removesuffix(".weight")))  # the same masks
    return (merge_utils.dare_ties if method == "dare_ties" else merge_utils.dare_linear)(tasks, w, density)


def ours(method, adapters, weights, density, r, model, seed=0):
    if method == "ties":
        return lf.ties(adapters, weights, density=density, r=r, model=model)
    if method == "magnitude_prune":
        return lf.magnitude_prune(adapters, weights, density=density, r=r, model=model)
    return lf.dare(adapters, weights, density=density, r=r, seed=seed, ties=method == "dare_ties", model=model)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_merging_methods_equal_peft_dense_utilities(method, three):
    """At full rank (r = 64) ΔW equals PEFT's dense result; at r = 4 it is that result's truncated SVD."""
    model, adapters, weights = three
    before, leaves = snapshot(model), [leaves_of(p) for p in adapters]
    full = ours(method, adapters, weights, 0.3, 64, model)
    low = ours(method, adapters, weights, 0.3, 4, model)
    assert_untouched(model, before)
    for p, kept in zip(adapters, leaves):
        assert_leaves_unchanged(p, kept)
    got_full, got_low = lf.delta_weights(model, full), lf.delta_weights(model, low)
    assert len(full.targets) == 8  # q, v, up, o in two layers: the union
    for key in got_full:
        reference = peft_reference(method, model, adapters, weights, key, 0.3, seed=0)
        assert (got_full[key] - reference).abs().max() < ATOL, key
        U, S, Vh = torch.linalg.svd(reference.double(), full_matrices=False)
        assert (got_low[key] - (U[:, :4] * S[:4]) @ Vh[:4]).abs().max() < ATOL, key
        assert low[key.removesuffix(".weight")]["A"].shape[0] == 4


def test_density_one_magnitude_prune_is_the_dense_weighted_sum(three):
    model, adapters, weights = three
    result = lf.magnitude_prune(adapters, weights, density=1.0, r=64, model=model)
    assert max_diff(lf.delta_weights(model, result), dense_sum(model, adapters, weights)) < ATOL


def test_dare_is_deterministic_and_seeded():
    model = tiny_qwen3()
    a, b = make("lora", model, seed=0), make("lora", model, seed=1)
    first = lf.dare([a, b], [1.0, 1.0], density=0.5, r=4, seed=7)
    again = lf.dare([a, b], [1.0, 1.0], density=0.5, r=4, seed=7)
    other = lf.dare([a, b], [1.0, 1.0], density=0.5, r=4, seed=8)
    assert all(torch.equal(t, again[p][k]) for p, k, t in first.leaves())
    path = first.targets[0].path
    assert not torch.equal(first[path]["B"], other[path]["B"])


def test_dare_expectation_is_the_weighted_sum():
    """Over N seeds the mean of DARE's ΔW is Σ w_i ΔW_i. Each entry of one draw is Σ_i w_i ΔW_i m_i / p with
    m_i ~ Bernoulli(p): variance σ² = Σ_i w_i² ΔW_i² (1 − p) / p, so the mean of N draws has standard error
    σ / √N and z = (mean − Σ w_i ΔW_i) / (σ / √N) is ≈ N(0, 1) per entry (N = 300: a sum of 300 i.i.d. terms).
    Over the 4096 entries of a 64 × 64 target, mean(z²) is 1 ± √(2/4096) ≈ 1 ± 0.022 (checked within 0.15,
    ~7 standard deviations) and max |z| stays below 6 (P(|z| > 6) ≈ 2e-9 per entry). The seeds are fixed, so
    the test is deterministic; these bounds say why it is not a tuned tolerance."""
    model = tiny_qwen3()
    one = {"target_names": (r"layers\.0\.self_attn\.q_proj$",)}
    a, b = make("lora", model, seed=0, **one), make("lora", model, seed=1, **one)
    weights, p, N = [0.8, -0.5], 0.4, 300
    key = "model.layers.0.self_attn.q_proj.weight"
    d_a, d_b = lf.delta_weights(model, a)[key], lf.delta_weights(model, b)[key]
    draws = torch.stack(
        [lf.delta_weights(model, lf.dare([a, b], weights, density=p, r=64, seed=s))[key] for s in range(N)]
    )
    sigma = torch.sqrt((weights[0] ** 2 * d_a**2 + weights[1] ** 2 * d_b**2) * (1 - p) / p)
    z = (draws.mean(0) - (weights[0] * d_a + weights[1] * d_b)) / (sigma / math.sqrt(N))
    assert abs((z**2).mean().item() - 1) < 0.15
    assert z.abs().max().item() < 6


def test_ties_on_a_4bit_base_uses_the_dequantized_weight(qwen3_4bit):
    """DoRA's ΔW on a 4-bit base depends on the dequantized W; TIES of two equals PEFT's ties on those ΔW."""
    adapters = [make("dora", qwen3_4bit, seed=s, target_names=(r"k_proj$",)) for s in (0, 1)]
    result = lf.ties(adapters, [1.0, 1.0], density=0.5, r=32, model=qwen3_4bit)
    got = lf.delta_weights(qwen3_4bit, result)
    for key in got:
        tasks = [lf.delta_weights(qwen3_4bit, p)[key] for p in adapters]
        assert (got[key] - merge_utils.ties(tasks, torch.tensor([1.0, 1.0]), 0.5)).abs().max() < ATOL


def test_methods_refuse_a_bias_change_a_lora_cannot_carry():
    """IA3 scales the bias too; with a zero bias (HF's init) that is no change, with a real one it is refused."""
    model = tiny_qwen3(attention_bias=True)
    params = make("ia3", model, target_names=(r"q_proj$",))
    lf.ties([params], [1.0], density=0.5, r=4, model=model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()
    with pytest.raises(
        ValueError, match=r"ties: `adapters\[0\]` changes the bias of 'model.layers.0.self_attn.q_proj'"
    ):
        lf.ties([params], [1.0], density=0.5, r=4, model=model)


# -- bad arguments -----------------------------------------------------------------------------------------------


class OwnLinear(nn.Module):
    """Linear-like (lf.init adapts it) but not an nn.Linear: a kind adapter arithmetic does not cover."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.weight = nn.Parameter(torch.randn(d_out, d_in))

    def forward(self, x):
        return x @ self.weight.T


@pytest.fixture(scope="module")
def bad():
    model = tiny_qwen3()
    a, b = make("lora", model), make("lora", model, seed=1)
    wide = make("lora", tiny_qwen3(intermediate_size=96), target_names=("up_proj$",))
    conv = a.targets[0]
    conv_params = lf.Params(
        {p: a[p] for p in a}, a.config, (dataclasses.replace(conv, kind="conv1d", module="Conv1D"),) + a.targets[1:]
    )
    own = nn.Sequential(OwnLinear(8, 8))
    own_params = make("lora", own, r=2)
    return {
        "model": model,
        "a": a,
        "b": b,
        "wide": wide,
        "conv": conv_params,
        "stacked": lf.stack([a, b]),
        "half": lf.split(make("pissa", model))[0],
        "dora": make("dora", model),
        "other_model": tiny_qwen3(num_hidden_layers=1),
        "own": own,
        "own_params": own_params,
    }


BAD_CALLS = {
    "empty": (lambda k: lf.weighted_sum([], []), r"weighted_sum: `adapters` is empty"),
    "single Params": (lambda k: lf.ties(k["a"], [1.0], density=0.5, r=4), r"ties: `adapters` must be a sequence"),
    "weights length": (lambda k: lf.weighted_sum([k["a"], k["b"]], [1.0]), r"`weights` has 1 values for 2 adapters"),
    "nan weight": (lambda k: lf.weighted_sum([k["a"]], [float("nan")]), r"`weights\[0\]` is nan; weights must be"),
    "inf weight": (lambda k: lf.dare([k["a"]], [math.inf], density=0.5, r=4, seed=0), r"`weights\[0\]` is inf"),
    "bool weight": (lambda k: lf.weighted_sum([k["a"]], [True]), r"`weights\[0\]` must be a real number"),
    "density 0": (
        lambda k: lf.ties([k["a"]], [1.0], density=0.0, r=4),
        r"ties: `density` must be a number in \(0, 1\]",
    ),
    "density > 1": (
        lambda k: lf.magnitude_prune([k["a"]], [1.0], density=1.5, r=4),
        r"magnitude_prune: `density` must be a number in \(0, 1\]",
    ),
    "density nan": (lambda k: lf.dare([k["a"]], [1.0], density=math.nan, r=4, seed=0), r"`density` must be"),
    "r 0": (lambda k: lf.resize(k["a"], 0), r"resize: `r` must be a positive int, got 0"),
    "r negative": (lambda k: lf.ties([k["a"]], [1.0], density=0.5, r=-2), r"ties: `r` must be a positive int"),
    "r bool": (lambda k: lf.resize(k["a"], True), r"`r` must be a positive int, got True"),
    "rank_pattern 0": (lambda k: lf.resize(k["a"], 4, rank_pattern={"q_proj": 0}), r"`rank_pattern\['q_proj'\]`"),
    "other shapes": (
        lambda k: lf.weighted_sum([k["a"], k["wide"]], [1.0, 1.0]),
        r"target 'model.layers.0.mlp.up_proj' is 64 -> 96 .* in `adapters\[1\]` but 64 -> 128 .* different models",
    ),
    "other model": (
        lambda k: lf.delta_weights(k["other_model"], k["a"]),
        r"delta_weights: target 'model.layers.1.self_attn.q_proj' is not a module of Qwen3ForCausalLM",
    ),
    "other model, merging": (
        lambda k: lf.ties([k["a"]], [1.0], density=0.5, r=4, model=k["other_model"]),
        r"ties: target 'model.layers.1.self_attn.q_proj' is not a module",
    ),
    "stacked": (
        lambda k: lf.resize(k["stacked"], 4),
        r"resize: `params` stacks 2 adapters; resize each of lf.unstack\(params\)",
    ),
    "split half": (
        lambda k: lf.weighted_sum([k["half"]], [1.0]),
        r"`adapters\[0\]` is the trainable half of lf.split .*lf.combine\(trainable, frozen\)",
    ),
    "dense without model": (
        lambda k: lf.ties([k["a"], k["dora"]], [1.0, 1.0], density=0.5, r=4),
        r"ties: `adapters\[1\]` \(DoRAConfig\) has a ΔW that is W' − W.*pass the base model as `model=`",
    ),
    "other kind": (
        lambda k: lf.weighted_sum([k["conv"]], [1.0]),
        r"target 'model.layers.0.self_attn.q_proj' of `adapters\[0\]` is a Conv1D; adapter arithmetic covers",
    ),
    "not nn.Linear": (
        lambda k: lf.delta_weights(k["own"], k["own_params"]),
        r"delta_weights: target '0' of `params` is a OwnLinear; adapter arithmetic covers nn.Linear-style targets only",
    ),
    "majority_sign": (
        lambda k: lf.ties([k["a"]], [1.0], density=0.5, r=4, majority_sign="mean"),
        r"`majority_sign` must be 'total' or 'frequency'",
    ),
    "seed": (lambda k: lf.dare([k["a"]], [1.0], density=0.5, r=4, seed=None), r"dare: `seed` must be an int"),
    "not Params": (lambda k: lf.delta_weights(k["model"], {"x": {}}), r"delta_weights: `params` must be lora_func"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_are_refused_by_name(case, bad):
    call, message = BAD_CALLS[case]
    with pytest.raises((ValueError, TypeError), match=message):
        call(bad)
