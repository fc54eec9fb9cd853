"""Adapter arithmetic as pure functions: exact ΔW, weighted sums, rank resizing, TIES / DARE / magnitude pruning.

Every function maps adapters (`Params`) to dense tensors or to a new adapter; inputs and the model are
never modified. The object of all of them is each target's weight change

    ΔW_t = W'_t − W_t        (W' the merged weight of `lf.merge`, W the base weight, (d_out, d_in))

The low-rank family stores ΔW as a product of factors, ΔW = B' A' (the scale folded into B'), each variant
declaring them in its own file (`LowRank` in `Variant.capabilities`):

    LoRA, EVA          B' = s B,                         A' = A                  s = alpha/r (rsLoRA: alpha/√r),
                                                                                 per target from the patterns
    PiSSA              B' = s [B, B − B0],               A' = [A − A0; A0]       s (B A − B0 A0), rank 2r
    VeRA               B' = diag(λ_b) B_s,               A' = diag(λ_d) A_s
    DeLoRA             B' = B diag(λ / (r ‖b_i‖ ‖a_i‖)), A' = A diag(w)
    SSVD, AntiPaSTO    B' = U M,                         A' = Vᵀ                 M: the r × r core
    HRA                B' = −W B,                        A' = A                  rank 2r; reads the base W
    LoHa               B' = s [W1a_i ⊙ W2a_j],           A' = [W1b_i ⊙ W2b_j]    Khatri–Rao, rank r²
    LoKr               B' = s (U1 ⊗ U2),                 A' = V1 ⊗ V2            W1 = U1 V1, W2 = U2 V2

`weighted_sum` adds them exactly by concatenation, Σ_i w_i B'_i A'_i = [w_1 B'_1 … w_n B'_n] [A'_1; …; A'_n]
(ranks add), never by averaging factors: ½(A₁ + A₂), ½(B₁ + B₂) gives ¼ (B₁ + B₂)(A₁ + A₂), with the
cross terms B₁A₂ + B₂A₁ (docs/internals.md; PEFT's `add_weighted_adapter` linear/ties/dare modes).
DoRA, IA3, IA3-FF, ROAD and OFT rescale or rotate W itself (they declare `Dense`): their ΔW is dense (full rank
in general), so it has no exact low-rank sum; the merging methods (`ties`, `dare`, `magnitude_prune`, `resize`) take it
as a dense matrix, from the model's (dequantized) base weight.

Results are ordinary LoRAs (`lf.LoRAConfig`): scale 1 on every target (alpha = r, `alpha_pattern` = the
`rank_pattern`), per-target ranks in `rank_pattern`, leaves new tensors (A and B trainable, like `lf.init`'s),
in the adapters' dtype, on their device. `lf.apply`, `lf.save`, `lf.to_peft` and `lf.merge` take them.
Low-rank results from an SVD are balanced: B = U_r √S_r, A = √S_r V_rᵀ.

Targets: nn.Linear-style layers (`nn.Linear` and its subclasses, bitsandbytes Linear4bit / Linear8bitLt,
whose ΔW is computed from the dequantized weight). Any other kind of target is refused by name.
Stacked adapters (`lf.stack`) are refused: give `lf.unstack(params)`.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ._config import _pattern_value, config_for, normalize
from ._kind import Target
from ._params import SHARED, Params
from ._sharded import parameter, placed_like
from ._structure import check
from ._variant import LowRank, Site, Variant
from .kinds import site_for
from .variants import lora, variant_for

Factors = tuple[torch.Tensor, torch.Tensor]  # (B', A') with ΔW = B' @ A'


# nn.Linear and its subclasses (`Target.module`): weight (d_out, d_in), LoRA's layout. Others are refused by name.
LINEAR_KINDS = frozenset(
    {"Linear", "NonDynamicallyQuantizableLinear", "Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt"}
)


def _low_rank(variant: Variant) -> LowRank | None:
    """The variant's `LowRank` record (its ΔW as factors), or None where it declares its ΔW `Dense`."""
    return variant.capability(LowRank)


def _needs_weight(variant: Variant) -> bool:
    low = _low_rank(variant)
    return low is None or low.reads_weight


# Kinds whose ΔW `delta_weights` gives though the rest of adapter arithmetic does not: a normalisation layer's ΔW is
# the change of its own weight vector (read as a (d, 1) column, returned as the (d,) vector), whatever the layer
# computes with it (LN Tuning).
# An embedding's ΔW (Trainable Tokens) is read (d, num_embeddings), returned as its (num_embeddings, d) weight.
DELTA_ONLY_KINDS = {
    "norm": lambda delta, own: delta.reshape(own.shape),
    "embedding": lambda delta, own: delta.t(),
}


# -- checking arguments ------------------------------------------------------------------------------------------


def _check_params(params: Any, where: str, caller: str, kinds: Any = ()) -> Params:
    """A whole, unstacked adapter: every declared leaf present, nothing extra, declared shapes; targets nn.Linear-style
    or of `kinds`."""
    if not isinstance(params, Params):
        raise TypeError(f"{caller}: {where} must be lora_func Params, got {type(params).__name__}")
    check(params, caller, stacked=False, name=where.strip("`"))  # whole, unstacked, every leaf as declared
    for target in params.targets:
        if target.module not in LINEAR_KINDS and target.kind not in kinds:
            raise ValueError(
                f"{caller}: target {target.path!r} of {where} is a {target.module}; adapter arithmetic covers "
                f"nn.Linear-style targets only ({', '.join(sorted(LINEAR_KINDS))})"
            )
    return params


def _check_adapters(adapters: Any, caller: str) -> list[Params]:
    if isinstance(adapters, Params):
        raise TypeError(f"{caller}: `adapters` must be a sequence of Params, got a single Params; wrap it in a list")
    if not isinstance(adapters, Sequence) or isinstance(adapters, (str, bytes)):
        raise TypeError(f"{caller}: `adapters` must be a list of Params, got {type(adapters).__name__}")
    if not adapters:
        raise ValueError(f"{caller}: `adapters` is empty; give at least one Params")
    return [_check_params(p, f"`adapters[{i}]`", caller) for i, p in enumerate(adapters)]


def _check_weights(weights: Any, count: int, caller: str) -> list[float]:
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1:
            raise ValueError(f"{caller}: `weights` must be 1-D, got a tensor of shape {tuple(weights.shape)}")
        weights = weights.tolist()
    if not isinstance(weights, Sequence) or isinstance(weights, (str, bytes)):
        raise TypeError(f"{caller}: `weights` must be a list of numbers, got {type(weights).__name__}")
    if len(weights) != count:
        raise ValueError(f"{caller}: `weights` has {len(weights)} values for {count} adapters; give one per adapter")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"{caller}: `weights[{i}]` must be a real number, got {w!r}")
        if not math.isfinite(w):
            raise ValueError(f"{caller}: `weights[{i}]` is {w}; weights must be finite")
        out.append(float(w))
    return out


def _check_rank(r: Any, caller: str, name: str = "r") -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{caller}: `{name}` must be a positive int, got {r!r}")
    return r


def _check_density(density: Any, caller: str) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"{caller}: `density` must be a number in (0, 1], got {density!r}")
    return float(density)


def _pairs(rank_pattern: Any, caller: str) -> tuple[tuple[str, int], ...]:
    """`rank_pattern` as config fields take it ({regex: rank} or pairs), checked as they are."""
    pairs = rank_pattern if rank_pattern is not None else ()
    return normalize(pairs, tuple[tuple[str, int], ...], "rank_pattern", caller)


def _rank_for(r: int, rank_pattern: tuple, caller: str) -> Callable[[Target], int]:
    """The requested rank of each target: `rank_pattern` (matched as config patterns are), else `r`, at most
    min(d_in, d_out) (where the best rank-r approximation is ΔW itself)."""
    for pattern, value in rank_pattern:
        _check_rank(value, caller, f"rank_pattern[{pattern!r}]")
    return lambda t: min(_pattern_value(rank_pattern, t.path, r), t.d_in, t.d_out)


def _union(adapters: list[Params], caller: str) -> list[Target]:
    """The targets of all adapters, in order of first appearance; one path must mean one layer shape."""
    seen: dict[str, tuple[int, Target]] = {}
    for i, p in enumerate(adapters):
        for t in p.targets:
            if t.path not in seen:
                seen[t.path] = (i, t)
                continue
            j, first = seen[t.path]
            if (t.d_in, t.d_out, t.roles) != (first.d_in, first.d_out, first.roles):
                raise ValueError(
                    f"{caller}: target {t.path!r} is {t.d_in} -> {t.d_out} ({'+'.join(t.roles)}) in `adapters[{i}]` "
                    f"but {first.d_in} -> {first.d_out} ({'+'.join(first.roles)}) in `adapters[{j}]`: "
                    "adapters for different models"
                )
    return [t for _, t in seen.values()]


def _module(model: nn.Module, target: Target, caller: str) -> nn.Module:
    """The target's layer in `model`, which must be nn.Linear-style and of the adapter's shape."""
    try:
        module = model.get_submodule(target.path)
    except AttributeError:
        raise ValueError(f"{caller}: target {target.path!r} is not a module of {type(model).__name__}") from None
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"{caller}: target {target.path!r} is a {type(module).__name__}; adapter arithmetic covers nn.Linear "
            "layers (and bitsandbytes' Linear4bit / Linear8bitLt) only"
        )
    if (module.in_features, module.out_features) != (target.d_in, target.d_out):
        raise ValueError(
            f"{caller}: target {target.path!r} is {module.in_features} -> {module.out_features} in the model, "
            f"but the adapter was built for {target.d_in} -> {target.d_out}"
        )
    return module


# -- ΔW of one adapter -------------------------------------------------------------------------------------------


def _leaves(params: Params, path: str) -> dict[str, torch.Tensor]:
    return {**params[SHARED], **params[path]} if SHARED in params else params[path]


def _compute_dtype(params: Params) -> torch.dtype:
    return torch.promote_types(params.config.dtype, torch.float32)


class _Delta(NamedTuple):
    """One adapter's ΔW at one target: factors (B', A'), or a dense matrix; and the bias change, if any."""

    factors: Factors | None
    dense: torch.Tensor | None
    bias: torch.Tensor | None

    def full(self) -> torch.Tensor:
        return self.dense if self.factors is None else self.factors[0] @ self.factors[1]

    @property
    def rank(self) -> int:
        return min(self.dense.shape) if self.factors is None else self.factors[1].shape[0]


def _deltas(params: Params, where: str, caller: str, model: nn.Module | None) -> dict[str, _Delta]:
    """ΔW of every target of `params`: factors for the low-rank family, else merged − W (from `model`)."""
    return dict(_each_delta(params, where, caller, model))


def _each_delta(params: Params, where: str, caller: str, model: nn.Module | None) -> Iterator[tuple[str, _Delta]]:
    """`_deltas` one target at a time: (path, ΔW), a dense ΔW dropped by the caller before the next is computed."""
    variant = variant_for(params.config, caller=caller)
    if model is None and _needs_weight(variant):
        why = (
            "reads the base weight (ΔW = −W B A)"
            if _low_rank(variant) is not None
            else "is W' − W, not a product of low-rank factors (it rescales or rotates W)"
        )
        raise ValueError(
            f"{caller}: {where} ({type(params.config).__name__}) has a ΔW that {why}; pass the base model as `model=`"
        )
    dtype = _compute_dtype(params)
    low = _low_rank(variant)
    for target in params.targets:
        if model is None:
            site = Site(target, config_for(params.config, target.path), None)
        else:
            if target.kind not in DELTA_ONLY_KINDS:  # those: located and checked by `site_for`
                _module(model, target, caller)
            site = site_for(model, target, params.config, caller)
        leaves = {k: v.to(dtype) for k, v in _leaves(params, target.path).items()}
        if low is not None:
            B, A = low.factors(leaves, site, lambda s=site: s.base.weight().to(dtype))
            if B.dim() != 2 or A.dim() != 2 or (B.shape[0], A.shape[1]) != (target.d_out, target.d_in):
                raise ValueError(
                    f"{caller}: the factors of {target.path!r} ({target.module}) in {where} are not a "
                    f"({target.d_out}, d) · (d, {target.d_in}) product"
                )
            yield target.path, _Delta((B, A), None, None)
            continue
        # Dense: W' − W, in float64 so that the difference keeps float32's precision of ΔW itself.
        weight = site.base.weight().to(torch.float64)
        bias = site.base.bias
        bias = None if bias is None else bias.to(torch.float64)
        f64 = {k: v.to(torch.float64) for k, v in leaves.items()}
        merged, new_bias = variant.merge(weight, bias, f64, site)
        delta_bias = None if new_bias is None or new_bias is bias else (new_bias - bias).to(dtype)
        yield target.path, _Delta(None, (merged - weight).to(dtype), delta_bias)


def _weight_key(path: str, leaf: str) -> str:
    return f"{path}.{leaf}" if path else leaf


def delta_weights(model: nn.Module, params: Params) -> dict[str, torch.Tensor]:
    """The exact dense weight change of every target: `{"<path>.weight": ΔW}`, ΔW = merged − base, (d_out, d_in).

    For the low-rank family ΔW is computed from the factors (s·B A for LoRA, s (B A − B0 A0) for PiSSA, ...;
    see the module docstring), without building the merged weight; for DoRA, IA3, IA3-FF and ROAD it is
    W' − W from the variant's merge, in float64 before rounding. A variant that changes the bias too (IA3 and
    ROAD on layers with a bias) also gets `"<path>.bias": Δb`: the keys are those of `lf.merge`, and
    `lf.merge(model, params)[k]` equals `base[k] + delta_weights(model, params)[k]`.
    Float32 (float64 for float64 adapters), on each layer's device; bitsandbytes bases are dequantized. On a base
    sharded by FSDP2, each ΔW is a `DTensor` placed as its base parameter (this rank's slice), as `lf.merge`'s.
    Differentiable with respect to `params` (a penalty on ‖ΔW‖, say). Pure: the model is not changed.
    Stacked params (`lf.stack`) are refused: pass each of `lf.unstack(params)`. A normalisation layer (LN Tuning)
    gets the change of its weight vector and of its bias, an embedding (Trainable Tokens) its (num_embeddings, d)
    weight's change.

    >>> dw = lf.delta_weights(model, params)
    >>> dw["model.layers.0.self_attn.q_proj.weight"].shape   # (d_out, d_in)
    """
    params = _check_params(params, "`params`", "delta_weights", kinds=DELTA_ONLY_KINDS)
    kinds = {t.path: t.kind for t in params.targets}
    out = {}
    for path, delta in _each_delta(params, "`params`", "delta_weights", model):
        for leaf, tensor in (("weight", delta.full()), ("bias", delta.bias)):
            if tensor is not None:  # a sharded base (FSDP2): each rank keeps its slice, placed as the base parameter
                key = _weight_key(path, leaf)
                own = parameter(model, key)
                if leaf == "weight" and kinds[path] in DELTA_ONLY_KINDS and own is not None:  # in its own layout
                    tensor = DELTA_ONLY_KINDS[kinds[path]](tensor, own)
                out[key] = placed_like(tensor, own)
    return out


# -- building the result: an ordinary LoRA -------------------------------------------------------------------------


def _targeting(adapters: list[Params], targets: list[Target]) -> dict[str, Any]:
    """Config fields that select exactly `targets`: the adapters' own where they agree and each covers all
    of `targets`, else one exact-path regex."""
    fields = ("target_roles", "target_names", "exclude_names", "layers")
    own = {tuple(getattr(p.config, f) for f in fields) for p in adapters}
    paths = [t.path for t in targets]
    if len(own) == 1 and all([t.path for t in p.targets] == paths for p in adapters):
        return dict(zip(fields, own.pop()))
    exact = "^(?:" + "|".join(re.escape(p) for p in paths) + ")$"
    return {"target_roles": None, "target_names": (exact,), "exclude_names": (), "layers": None}


def _as_lora(
    factors: dict[str, Factors], targets: list[Target], adapters: list[Params], dtype: torch.dtype, caller: str
) -> Params:
    """A LoRA with ΔW_t = B_t A_t on each target (scale 1: alpha = r per target)."""
    ranks = {t.path: factors[t.path][1].shape[0] for t in targets}
    r = Counter(ranks.values()).most_common(1)[0][0]
    exceptions = tuple((f"^{re.escape(path)}$", k) for path, k in ranks.items() if k != r)
    cfg = lora.LoRAConfig(
        r=r,
        alpha=float(r),
        dtype=dtype,
        rank_pattern=exceptions,
        alpha_pattern=tuple((pattern, float(k)) for pattern, k in exceptions),
        **_targeting(adapters, targets),
    )
    entries = {}
    for t in targets:
        B, A = factors[t.path]
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"{caller}: the result for {t.path!r} has NaN or inf values (from the adapters' leaves)")
        entries[t.path] = {
            "A": A.detach().to(dtype).contiguous().requires_grad_(),
            "B": B.detach().to(dtype).contiguous().requires_grad_(),
        }
    return Params(entries, cfg, tuple(targets))


def _balanced(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int, dtype: torch.dtype) -> Factors:
    """(U_r √S_r, √S_r V_rᵀ)."""
    root = S[:r].clamp(min=0).sqrt()
    return (U[:, :r] * root).to(dtype), (root[:, None] * Vh[:r]).to(dtype)


def _top_factors(delta: _Delta, r: int, dtype: torch.dtype) -> Factors:
    """The best rank-r approximation of ΔW (Eckart–Young: truncated SVD), as balanced factors.

    From factors B' (d_out, k), A' (k, d_in): B' = Q_b R_b, A'ᵀ = Q_a R_a, and the SVD of the small core
    R_b R_aᵀ = U S Vᵀ gives ΔW = (Q_b U) S (Q_a V)ᵀ, O((d_in + d_out) k²), in float64. Dense: its SVD.
    """
    if delta.factors is None:
        dense = delta.dense
        if dense.shape[0] < dense.shape[1]:  # LAPACK's SVD is ~2x faster on the tall side: ΔWᵀ = V S Uᵀ
            V, S, Uh = torch.linalg.svd(dense.T, full_matrices=False)
            return _balanced(Uh.T, S, V.T, r, dtype)
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        return _balanced(U, S, Vh, r, dtype)
    B, A = (f.to(torch.float64) for f in delta.factors)
    Qb, Rb = torch.linalg.qr(B)  # (d_out, m), (m, k)
    Qa, Ra = torch.linalg.qr(A.T)  # (d_in, n), (n, k)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)  # core (m, n)
    return _balanced(Qb @ U, S, Vh @ Qa.T, r, dtype)


def _result_dtype(adapters: list[Params]) -> torch.dtype:
    dtype = adapters[0].config.dtype
    for p in adapters[1:]:
        dtype = torch.promote_types(dtype, p.config.dtype)
    return dtype


# -- weighted sum and resize (exact) -----------------------------------------------------------------------------


def weighted_sum(adapters: Sequence[Params], weights: Sequence[float], *, model: nn.Module | None = None) -> Params:
    """Σ_i w_i ΔW_i exactly, as one LoRA: the factors are concatenated, so ranks add.

        ΔW_t = Σ_i w_i B'_i A'_i = [w_1 B'_1, …, w_n B'_n] · [A'_1; …; A'_n]      (B'_i: the scale folded in)

    For the low-rank family (LoRA, rsLoRA, PiSSA, EVA, VeRA, DeLoRA, SSVD, AntiPaSTO, HRA, LoHa, LoKr; factors in
    the module docstring), each adapter with its own rank, scale and per-target `rank_pattern` / `alpha_pattern`.
    Targets: the union of the adapters' (a target an adapter lacks counts as ΔW = 0, as in PEFT's
    `add_weighted_adapter`). Weights may be negative (task negation: `weighted_sum([p], [-1.0])`). Where the
    summed rank exceeds min(d_in, d_out), the sum is re-factored exactly at that rank (SVD of the concatenated factors).
    HRA's factor B' = −W B reads the base weight: pass `model=`. With `model`, every target is checked against it.
    DoRA, IA3, IA3-FF and ROAD are refused: their ΔW is not low rank; `lf.magnitude_prune(adapters, weights,
    density=1.0, r=..., model=model)` is their weighted sum truncated to rank r (exact at r = min(d_in, d_out)).

    >>> both = lf.weighted_sum([math_adapter, code_adapter], [0.5, 0.5])   # rank r1 + r2, exact
    """
    caller = "weighted_sum"
    adapters = _check_adapters(adapters, caller)
    weights = _check_weights(weights, len(adapters), caller)
    for i, p in enumerate(adapters):
        if _low_rank(variant_for(p.config, caller=caller)) is None:
            raise ValueError(
                f"{caller}: `adapters[{i}]` ({type(p.config).__name__}) has a ΔW that is not a product of "
                "low-rank factors (it rescales or rotates W), so no exact sum of factors exists; merge the dense "
                "ΔW instead: lf.magnitude_prune(adapters, weights, density=1.0, r=..., model=model) is the same "
                "weighted sum truncated to rank r, and lf.ties / lf.dare / lf.resize work on dense ΔW too"
            )
    targets = _union(adapters, caller)
    dtype = _result_dtype(adapters)
    compute = torch.promote_types(dtype, torch.float32)
    with torch.no_grad():
        deltas = [_deltas(p, f"`adapters[{i}]`", caller, model) for i, p in enumerate(adapters)]
        factors = {}
        for t in targets:
            parts = [(w, d[t.path].factors) for w, d in zip(weights, deltas) if t.path in d]
            device = parts[0][1][0].device
            B = torch.cat([w * Bi.to(device, compute) for w, (Bi, _) in parts], dim=1)  # (d_out, Σ k_i)
            A = torch.cat([Ai.to(device, compute) for _, (_, Ai) in parts])  # (Σ k_i, d_in)
            cap = min(t.d_in, t.d_out)
            factors[t.path] = _top_factors(_Delta((B, A), None, None), cap, compute) if A.shape[0] > cap else (B, A)
    return _as_lora(factors, targets, adapters, dtype, caller)


def resize(
    params: Params, r: int, *, rank_pattern: Mapping[str, int] | None = None, model: nn.Module | None = None
) -> Params:
    """Each target's ΔW as its best rank-r approximation, as a LoRA (Eckart–Young: the truncated SVD).

        ΔW = U S Vᵀ  →  B = U_r √S_r,  A = √S_r V_rᵀ,    ‖ΔW − B A‖_F = ‖(S_{r+1}, S_{r+2}, …)‖₂ (the least possible)

    Exact where r is at least the target's current rank k (the result then keeps rank k: no zero padding), and
    r is capped at min(d_in, d_out). `rank_pattern` ({regex: rank}, matched as config patterns are) gives some
    targets another rank; the result's `rank_pattern` holds every rank that differs from its `r`. For factored
    adapters the SVD runs on the small k × k core of the factors (see `_top_factors`), not on ΔW. Variants whose
    ΔW is dense (DoRA, IA3, IA3-FF, ROAD) and HRA need `model=`.

    >>> small = lf.resize(params, 4)                       # r=16 → r=4
    >>> plain = lf.resize(pissa_params, 2 * pissa_params.config.r)   # PiSSA as an ordinary LoRA, exactly
    """
    caller = "resize"
    params = _check_params(params, "`params`", caller)
    rank_of = _rank_for(_check_rank(r, caller), _pairs(rank_pattern, caller), caller)
    dtype = _compute_dtype(params)
    with torch.no_grad():
        deltas = _deltas(params, "`params`", caller, model)
        _refuse_bias(deltas, "`params`", caller)
        factors = {}
        for t in params.targets:
            factors[t.path] = _top_factors(deltas[t.path], min(rank_of(t), deltas[t.path].rank), dtype)
    return _as_lora(factors, list(params.targets), [params], params.config.dtype, caller)


def _refuse_bias(deltas: dict[str, _Delta], where: str, caller: str) -> None:
    for path, delta in deltas.items():
        if delta.bias is not None and bool((delta.bias != 0).any()):
            raise ValueError(
                f"{caller}: {where} changes the bias of {path!r} too (by up to {delta.bias.abs().max().item():.3g}), "
                "which a LoRA result cannot carry"
            )


# -- merging methods on dense ΔW (PEFT's conventions, peft/utils/merge_utils.py) ---------------------------------


def _magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = ⌊density · numel⌋ entries of largest |ΔW| (PEFT's `magnitude_based_pruning`)."""
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.topk(delta.abs().reshape(-1), k=int(density * delta.numel()), largest=True).indices] = 1
    return mask.reshape(delta.shape)


def _elect_and_merge(tasks: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    """TIES' sign election and disjoint merge (PEFT's `calculate_majority_sign_mask` + `disjoint_merge`):
    γ = sign(Σ_i τ_i) (`total`) or sign(Σ_i sign τ_i) (`frequency`), ties to +; the merge is the mean of the
    weighted w_i τ_i whose sign agrees with γ, over the number of those that agree (at least 1)."""
    sign = tasks.sign()
    magnitude = tasks.sum(dim=0) if method == "total" else sign.sum(dim=0)
    agree = sign == torch.where(magnitude >= 0, 1.0, -1.0).to(tasks.dtype)
    weighted = tasks * weights.view(-1, *([1] * (tasks.dim() - 1)))
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def _weighted(tasks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (tasks * weights.view(-1, *([1] * (tasks.dim() - 1)))).sum(dim=0)


def target_seed(seed: int, path: str) -> int:
    """The seed of DARE's masks at one target: a hash of (`seed`, path), so a target's masks do not depend
    on which other targets the adapters have, nor on their order."""
    digest = hashlib.sha256(f"lora_func.dare\0{seed}\0{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def _dense_merge(
    adapters: Sequence[Params],
    weights: Sequence[float],
    *,
    density: float,
    r: int,
    rank_pattern: Mapping[str, int] | None,
    model: nn.Module | None,
    caller: str,
    combine: Callable[[torch.Tensor, torch.Tensor, Target], torch.Tensor],
) -> Params:
    """Per target (the union): the stacked dense ΔW_i (zeros where an adapter lacks it), `combine`d, then
    truncated to rank r."""
    adapters = _check_adapters(adapters, caller)
    weights = _check_weights(weights, len(adapters), caller)
    _check_density(density, caller)
    rank_of = _rank_for(_check_rank(r, caller), _pairs(rank_pattern, caller), caller)
    targets = _union(adapters, caller)
    dtype = _result_dtype(adapters)
    compute = torch.promote_types(dtype, torch.float32)
    with torch.no_grad():
        deltas = []
        for i, p in enumerate(adapters):
            deltas.append(_deltas(p, f"`adapters[{i}]`", caller, model))
            _refuse_bias(deltas[-1], f"`adapters[{i}]`", caller)
        factors = {}
        for t in targets:
            dense = [d[t.path].full() if t.path in d else None for d in deltas]
            device = next(x for x in dense if x is not None).device
            zero = torch.zeros(t.d_out, t.d_in, dtype=compute, device=device)
            tasks = torch.stack([zero if x is None else x.to(device, compute) for x in dense])  # (n, d_out, d_in)
            merged = combine(tasks, torch.tensor(weights, dtype=compute, device=device), t)
            factors[t.path] = _top_factors(_Delta(None, merged, None), rank_of(t), compute)
    return _as_lora(factors, targets, adapters, dtype, caller)


def ties(
    adapters: Sequence[Params],
    weights: Sequence[float],
    *,
    density: float,
    r: int,
    majority_sign: str = "total",
    rank_pattern: Mapping[str, int] | None = None,
    model: nn.Module | None = None,
) -> Params:
    """TIES-Merging (Yadav et al. 2023, arXiv 2306.01708) of the dense ΔW_i, returned as a rank-r LoRA.

    Per target, with PEFT's dense conventions (`peft.utils.merge_utils.ties`):
        trim:   τ_i = ΔW_i keeping its ⌊density · numel⌋ entries of largest magnitude (density 1: all)
        elect:  γ = sign(Σ_i τ_i)  (`majority_sign="total"`; "frequency": sign(Σ_i sign τ_i)); 0 counts as +
        merge:  ΔW = Σ_i w_i τ_i [sign τ_i = γ] / max(1, Σ_i [sign τ_i = γ])     (a mean over the agreeing)
    then the best rank-r approximation (truncated SVD; `r` capped at min(d_in, d_out), where it is exact).
    Targets: the union (ΔW_i = 0 where an adapter lacks a target). `rank_pattern` ({regex: rank}) gives some
    targets another rank. Variants with a dense ΔW (DoRA, IA3, IA3-FF, ROAD) and HRA need `model=`.

    >>> merged = lf.ties([a, b], [1.0, 1.0], density=0.2, r=16)
    """
    if majority_sign not in ("total", "frequency"):
        raise ValueError(f"ties: `majority_sign` must be 'total' or 'frequency', got {majority_sign!r}")

    def combine(tasks, w, target):
        trimmed = torch.stack([t * _magnitude_mask(t, density) for t in tasks]) if density < 1 else tasks
        return _elect_and_merge(trimmed, w, majority_sign)

    return _dense_merge(
        adapters, weights, density=density, r=r, rank_pattern=rank_pattern, model=model, caller="ties", combine=combine
    )


def dare(
    adapters: Sequence[Params],
    weights: Sequence[float],
    *,
    density: float,
    r: int,
    seed: int,
    ties: bool = False,
    majority_sign: str = "total",
    rank_pattern: Mapping[str, int] | None = None,
    model: nn.Module | None = None,
) -> Params:
    """DARE (Yu et al. 2023, arXiv 2311.03099) on the dense ΔW_i, returned as a rank-r LoRA.

    Per target, with PEFT's dense conventions (`peft.utils.merge_utils.dare_linear` / `dare_ties`):
        drop and rescale:  τ_i = ΔW_i ⊙ M_i / density,   M_i ~ Bernoulli(density) entrywise, so E[τ_i] = ΔW_i
        `ties=False`:      ΔW = Σ_i w_i τ_i                       (E[ΔW] = Σ_i w_i ΔW_i: `weighted_sum`'s)
        `ties=True`:       TIES' sign election and disjoint mean on the τ_i (see `ties`)
    then the best rank-r approximation (truncated SVD). Deterministic: target t's masks come from a generator
    seeded with `target_seed(seed, path)` on the CPU, drawn for adapters 0, 1, … in turn (also for an adapter
    that lacks t, whose ΔW = 0), as PEFT draws them from torch's global generator; the same `seed` gives the same
    adapter on any device. Other arguments as in `ties`.

    >>> merged = lf.dare([a, b], [1.0, 1.0], density=0.3, r=16, seed=0)
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"dare: `seed` must be an int, got {seed!r}")
    if not isinstance(ties, bool):
        raise TypeError(f"dare: `ties` must be a bool, got {ties!r}")
    if majority_sign not in ("total", "frequency"):
        raise ValueError(f"dare: `majority_sign` must be 'total' or 'frequency', got {majority_sign!r}")

    def combine(tasks, w, target):
        generator = torch.Generator().manual_seed(target_seed(seed, target.path))
        dropped = []
        for task in tasks:
            p = torch.full(task.shape, density, dtype=task.dtype)
            dropped.append(task * torch.bernoulli(p, generator=generator).to(task.device) / density)
        dropped = torch.stack(dropped)
        return _elect_and_merge(dropped, w, majority_sign) if ties else _weighted(dropped, w)

    return _dense_merge(
        adapters, weights, density=density, r=r, rank_pattern=rank_pattern, model=model, caller="dare", combine=combine
    )


def magnitude_prune(
    adapters: Sequence[Params],
    weights: Sequence[float],
    *,
    density: float,
    r: int,
    rank_pattern: Mapping[str, int] | None = None,
    model: nn.Module | None = None,
) -> Params:
    """Magnitude pruning of each dense ΔW_i, then their weighted sum, returned as a rank-r LoRA.

    Per target, with PEFT's dense conventions (`peft.utils.merge_utils.magnitude_prune`):
        ΔW = Σ_i w_i τ_i,   τ_i = ΔW_i keeping its ⌊density · numel⌋ entries of largest magnitude
    then the best rank-r approximation (truncated SVD). With `density=1.0` nothing is pruned: this is the
    weighted sum of the dense ΔW_i, for variants whose ΔW is not low rank (DoRA, IA3, IA3-FF, ROAD), exact at
    r = min(d_in, d_out). Other arguments as in `ties`.

    >>> merged = lf.magnitude_prune([a, dora], [0.5, 0.5], density=1.0, r=32, model=model)
    """

    def combine(tasks, w, target):
        pruned = torch.stack([t * _magnitude_mask(t, density) for t in tasks]) if density < 1 else tasks
        return _weighted(pruned, w)

    return _dense_merge(
        adapters,
        weights,
        density=density,
        r=r,
        rank_pattern=rank_pattern,
        model=model,
        caller="magnitude_prune",
        combine=combine,
    )
