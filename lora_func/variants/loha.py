"""LoHa: the weight change is the Hadamard (element-wise) product of two rank-r products.

    ΔW = s · (W1a W1b) ⊙ (W2a W2b),   W1a, W2a (d_out, r),  W1b, W2b (r, fan_in),  s = alpha / r
    y' = y + x ΔWᵀ                      (a convolution: y + ΔW ⋆ x, with the layer's stride, padding, ...)

On a convolution fan_in = d_in / groups · ∏kernel and ΔW is the kernel flattened (PEFT's LoHa without
`use_effective_conv2d`), applied by the layer's own convolution (its padding mode, groups, dilation).

ΔW has rank up to r² with 4r(d_in + d_out)/2 values, twice LoRA's at the same r. As PEFT does, the forward
builds ΔW (d_out × d_in) and applies it, which is PEFT's order of operations, so outputs and gradients are
PEFT's to rounding. Its exact factors (for adapter arithmetic) are the Khatri–Rao products

    ΔW = B' A',   B'[:, i·r + j] = s · W1a[:, i] ⊙ W2a[:, j],   A'[i·r + j, :] = W1b[i, :] ⊙ W2b[j, :]   (rank r²)

and zero-padding each factor's rank (columns of W1a, W2a; rows of W1b, W2b) leaves ΔW unchanged.
Identity at init: W2b = 0 (W1a, W1b, W2a kaiming-uniform, as PEFT's `init_weights=True`), so ΔW is exactly 0.
Hyeon-Woo et al. 2022 (FedPara), arXiv 2108.06098; LyCORIS: Yeh et al. 2024, arXiv 2309.14859.
Reference: peft/tuners/loha/layer.py (`Linear`, `HadaWeight`, `reset_adapter_parameters`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._config import AdapterConfig
from .._kind import Target
from .._variant import LINEAR_LIKE, Init, Leaves, LowRank, Padding, PeftExchange, Recipe, Site, Variant
from ..kinds.conv import convolve, fan_in

LEAVES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")  # PEFT's parameter names


@dataclass(frozen=True)
class LoHaConfig(AdapterConfig):
    """LoHa (PEFT's `LoHaConfig`): `r`, `alpha` with PEFT's defaults (8, 8; s = alpha / r). `init_weights=False`
    draws W2b at random too (PEFT's option; the adapter then does not start at the identity)."""

    alpha: float = 8.0
    init_weights: bool = True


def scale(cfg: AdapterConfig) -> float:
    return cfg.alpha / cfg.r


def shapes(target: Target, cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
    # Any r > 0, as in PEFT: (W1a W1b) ⊙ (W2a W2b) is defined, and of rank <= min(r², d_out, fan_in), whatever r is.
    r, d_in, d_out = cfg.r, columns(target), target.d_out
    return {"hada_w1_a": (d_out, r), "hada_w1_b": (r, d_in), "hada_w2_a": (d_out, r), "hada_w2_b": (r, d_in)}


def columns(target: Target) -> int:
    """The columns of W in its kind's layout: d_in, or a convolution's d_in / groups · ∏kernel."""
    return fan_in(target) if target.kind == "conv" else target.d_in


def apply_delta(x: torch.Tensor, dw: torch.Tensor, site: Site) -> torch.Tensor:
    """x ΔWᵀ, or ΔW ⋆ x as the layer convolves (ΔW reshaped to its kernel), without bias; in ΔW's dtype."""
    x = x.to(dw.dtype)
    if site.target.kind != "conv":
        return F.linear(x, dw)
    return convolve(site.base, x, dw)


def create(target: Target, cfg: LoHaConfig, init: Init) -> Leaves:
    leaves = {name: torch.empty(shape) for name, shape in shapes(target, cfg).items()}
    for name in LEAVES:  # PEFT's draw order
        if name == "hada_w2_b" and cfg.init_weights:
            torch.nn.init.zeros_(leaves[name])
        else:
            torch.nn.init.kaiming_uniform_(leaves[name], a=math.sqrt(5), generator=init.generator)
    return leaves


def delta(leaves: Leaves, s: float) -> torch.Tensor:
    """ΔW = s · (W1a W1b) ⊙ (W2a W2b), (d_out, d_in), in the leaves' dtype (PEFT's `HadaWeight.forward`)."""
    return (leaves["hada_w1_a"] @ leaves["hada_w1_b"]) * (leaves["hada_w2_a"] @ leaves["hada_w2_b"]) * s


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    return y + apply_delta(x, delta(leaves, scale(site.config)), site).to(y.dtype)


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    return weight + delta({k: v.to(weight.dtype) for k, v in leaves.items()}, scale(site.config)), bias


def low_rank_factors(leaves: Leaves, site: Site, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """The Khatri–Rao factors (B' (d_out, r²), A' (r², d_in)) of ΔW; see the module docstring."""
    w1a, w1b, w2a, w2b = (leaves[k] for k in LEAVES)
    r = w1b.shape[0]
    B = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], r * r) * scale(site.config)
    A = (w1b[:, None, :] * w2b[None, :, :]).reshape(r * r, w1b.shape[1])
    return B, A


VARIANT = Variant(
    name="loha",
    config=LoHaConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    kinds=(*LINEAR_LIKE, "conv"),
    capabilities=(
        LowRank(low_rank_factors),
        Padding(axes=(("hada_w1_a", 1), ("hada_w1_b", 0), ("hada_w2_a", 1), ("hada_w2_b", 0)), scaled=("hada_w1_a",)),
        PeftExchange("loha"),
        Recipe(lr=2e-3),
    ),
)
