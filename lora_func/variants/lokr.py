"""LoKr: the weight change is a Kronecker product of a small matrix and a (low-rank) larger one.

    d_out = l · k,  d_in = m · n      (PEFT's `factorization`: divisors near √d, or `decompose_factor`)
    ΔW = s · W1 ⊗ W2,   W1 (l, m),  W2 (k, n),  s = alpha / r
    W2 = W2a W2b (k, r)(r, n) where r < max(k, n) / 2, else one full (k, n) leaf;
    W1 = W1a W1b (l, r)(r, m) likewise, only with `decompose_both=True`
    y' = y + x ΔWᵀ

On an nn.Conv2d (PEFT's `use_effective_conv2d=False`): d_in = in_channels / groups, a full W2 is (k, n, kh, kw) and
ΔW = s · W1 ⊗ W2 the kernel (W1 taken as (l, m, 1, 1)), a factored W2b is (r, n·kh·kw); ΔW is applied by the
layer's own convolution. Other convolutions are refused (PEFT's Conv1d kernel layout differs).
A leaf is either full (`lokr_w1`, `lokr_w2`) or a pair (`lokr_w1_a`/`lokr_w1_b`, `lokr_w2_a`/`lokr_w2_b`), decided
per target from its shape and rank exactly as PEFT decides. As in PEFT, the forward builds ΔW and applies it.
Exact factors for adapter arithmetic, by the mixed-product rule: with W1 = U1 V1 and W2 = U2 V2,
ΔW = s (U1 ⊗ U2)(V1 ⊗ V2), rank rank(W1)·rank(W2) (a full leaf W factors as W · I or I · W, the smaller side).
Identity at init: W1 = 0 (W1a = 0 where decomposed) with the rest kaiming-uniform, PEFT's `init_weights=True`.
Edalati et al. 2022 (KronA), arXiv 2212.10650; LyCORIS: Yeh et al. 2024, arXiv 2309.14859.
Reference: peft/tuners/lokr/layer.py (`LoKrLayer.update_layer`, `get_delta_weight`, `factorization`, `make_kron`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._config import AdapterConfig
from .._kind import Target
from .._variant import LINEAR_LIKE, Init, Leaves, LowRank, PeftExchange, Recipe, Site, Variant
from . import loha

# PEFT's parameter names, in PEFT's draw order.
LEAVES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


@dataclass(frozen=True)
class LoKrConfig(AdapterConfig):
    """LoKr (PEFT's `LoKrConfig`): `r`, `alpha` with PEFT's defaults (8, 8; s = alpha / r). `decompose_both`: W1 low
    rank too (where r < max(l, m) / 2); `decompose_factor`: the split of each dimension (-1: near its square root).
    `init_weights=False` draws W1 at random too (PEFT's option; then not the identity at init)."""

    alpha: float = 8.0
    decompose_both: bool = False
    decompose_factor: int = -1
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(
                f"LoKrConfig: `decompose_factor` must be -1 or a positive int, got {self.decompose_factor}"
            )


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m · n = dimension, m <= n: `factor` and its cofactor where it divides, else the divisor pair nearest
    the square root with m <= factor (PEFT's `factorization`, step for step)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def scale(cfg: AdapterConfig) -> float:
    return cfg.alpha / cfg.r


def kernel(target: Target) -> tuple[int, ...]:
    """A convolution's kernel size (nn.Conv2d only), () for a linear-like layer."""
    if target.kind != "conv":
        return ()
    size = tuple(target.get("kernel_size"))
    if len(size) != 2:
        raise ValueError(
            f"LoKrConfig: {target.path!r} is an nn.Conv{len(size)}d; LoKr adapts nn.Conv2d convolutions only"
        )
    return size


def shapes(target: Target, cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
    r, ks = cfg.r, kernel(target)
    d_in = target.d_in // target.get("groups") if ks else target.d_in
    m, n = factorization(d_in, cfg.decompose_factor)
    l, k = factorization(target.d_out, cfg.decompose_factor)  # noqa: E741 (PEFT's names)
    out: dict[str, tuple[int, ...]] = {}
    if cfg.decompose_both and r < max(l, m) / 2:
        out.update(lokr_w1_a=(l, r), lokr_w1_b=(r, m))
    else:
        out["lokr_w1"] = (l, m)
    if r < max(k, n) / 2:
        out.update(lokr_w2_a=(k, r), lokr_w2_b=(r, n * math.prod(ks)))
    else:
        out["lokr_w2"] = (k, n, *ks)
    return out


def create(target: Target, cfg: LoKrConfig, init: Init) -> Leaves:
    declared = shapes(target, cfg)
    leaves = {}
    for name in LEAVES:  # PEFT's `reset_adapter_parameters`: W1 (or W1a) zero, the rest kaiming-uniform
        if name not in declared:
            continue
        leaves[name] = torch.empty(declared[name])
        if cfg.init_weights and name in ("lokr_w1", "lokr_w1_a"):
            torch.nn.init.zeros_(leaves[name])
        else:
            torch.nn.init.kaiming_uniform_(leaves[name], a=math.sqrt(5), generator=init.generator)
    return leaves


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a ⊗ b for matrices, as `torch.kron` computes it (one product per entry), by broadcasting (vmappable)."""
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def w1(leaves: Leaves) -> torch.Tensor:
    return leaves["lokr_w1"] if "lokr_w1" in leaves else leaves["lokr_w1_a"] @ leaves["lokr_w1_b"]


def w2(leaves: Leaves) -> torch.Tensor:
    return leaves["lokr_w2"] if "lokr_w2" in leaves else leaves["lokr_w2_a"] @ leaves["lokr_w2_b"]


def delta(leaves: Leaves, s: float) -> torch.Tensor:
    """ΔW = s · W1 ⊗ W2 in the kind's (d_out, fan_in) layout, in the leaves' dtype (PEFT's `make_kron`)."""
    a, b = w1(leaves), w2(leaves)
    if b.dim() == 4:  # a full conv W2 (k, n, kh, kw): W1 as (l, m, 1, 1), the kernel flattened after
        full = (a[:, None, :, None, None, None] * b[None, :, None, :, :, :]).reshape(
            a.shape[0] * b.shape[0], a.shape[1] * b.shape[1], *b.shape[2:]
        )
        return (full * s).flatten(1)
    return kron(a, b) * s


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    return y + loha.apply_delta(x, delta(leaves, scale(site.config)), site).to(y.dtype)


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    return weight + delta({k: v.to(weight.dtype) for k, v in leaves.items()}, scale(site.config)), bias


def _split(leaves: Leaves, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with W = U V: the stored pair, or a full leaf against an identity on its smaller side."""
    if f"lokr_{which}" not in leaves:
        return leaves[f"lokr_{which}_a"], leaves[f"lokr_{which}_b"]
    full = leaves[f"lokr_{which}"]
    rows, cols = full.shape
    if rows <= cols:
        return torch.eye(rows, dtype=full.dtype, device=full.device), full
    return full, torch.eye(cols, dtype=full.dtype, device=full.device)


def low_rank_factors(leaves: Leaves, site: Site, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(s (U1 ⊗ U2), V1 ⊗ V2): ΔW by the mixed-product rule; see the module docstring."""
    U1, V1 = _split(leaves, "w1")
    U2, V2 = _split(leaves, "w2")
    return kron(U1, U2) * scale(site.config), kron(V1, V2)


VARIANT = Variant(
    name="lokr",
    config=LoKrConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    kinds=(*LINEAR_LIKE, "conv"),
    capabilities=(
        LowRank(low_rank_factors),
        PeftExchange("lokr"),
        Recipe(lr=2e-3),
    ),
)
