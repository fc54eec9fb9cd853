"""HRA: the base weight times a product of r Householder reflections, applied to the input.

    H_i = I − 2 û_i û_iᵀ,   û_i = u_i / ‖u_i‖,   R(u) = H_0 H_1 ⋯ H_{r-1},   W' = W R
    y' = (x Rᵀ) Wᵀ + b

R is never built: in compact WY form R = I − Û T Ûᵀ with T = (½ I + triu(ÛᵀÛ, 1))⁻¹ (r × r), so
x Rᵀ = x − ((x Û) Tᵀ) Ûᵀ, a rank-r update of the input (LoRA's low-rank product, A = Ûᵀ, B = Û T).
As an input transform it runs before any base layer, bitsandbytes included.
`r` is the number of reflections (even, at most d_in); `alpha` is unused.

Identity at init: u's columns start in equal pairs (PEFT's symmetric init) and H_u H_u = I. In floats
R(u0) is I only to rounding (~1 ulp of x, 2e-6 on MiniLM's outputs), so, as PiSSA does, a frozen copy
u0 of the initial u is kept and the input update is R(u) − R(u0), written with factors that are exact
zeros while u = u0:

    x' = x − (x (Û − Û0)) (Û T)ᵀ − (x Û0) (Û T − Û0 T0)ᵀ  =  x Rᵀ + x (I − R0)ᵀ,   R0 = R(u0) = I

With u0 at its init this is PEFT's HRA up to rounding; the bitwise identity costs one more rank-r product.
PEFT's `apply_GS=True` (Gram-Schmidt on u) is not offered: it gives R = I − 2 Q Qᵀ, never the identity.
Yuan et al. 2024, arXiv 2405.17484. Reference: peft/tuners/hra/layer.py (`HRALinear.get_delta_weight`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._config import AdapterConfig
from .._variant import LINEAR_LIKE, Init, Leaves, LowRank, PeftExchange, Recipe, Site, Variant
from ..kinds.linear import low_rank


@dataclass(frozen=True)
class HRAConfig(AdapterConfig):
    """HRA. `r`: number of Householder reflections, even (so that the init is the identity) and at most
    d_in of every target. `alpha` is unused."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r % 2:
            raise ValueError(f"HRAConfig: `r` must be even (reflections start in equal pairs, R = I), got {self.r}")
        for pattern, r in self.rank_pattern:
            if r % 2:
                raise ValueError(f"HRAConfig: `rank_pattern` value for {pattern!r} must be even, got {r}")


def shapes(target, cfg) -> dict[str, tuple[int, ...]]:
    if cfg.r > target.d_in:
        raise ValueError(f"HRAConfig: `r`={cfg.r} exceeds d_in={target.d_in} of {target.path!r}")
    return {"u": (target.d_in, cfg.r), "u0": (target.d_in, cfg.r)}


def create(target, cfg: HRAConfig, init: Init) -> Leaves:
    half = torch.empty(target.d_in, cfg.r // 2)
    torch.nn.init.kaiming_uniform_(half, a=math.sqrt(5), generator=init.generator)
    u = half.repeat_interleave(2, dim=1)  # (d_in, r): columns in equal pairs
    return {"u": u, "u0": u.clone()}


def wy_factors(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Û, Û T) with R = I − Û T Ûᵀ = H_0 ⋯ H_{r-1}."""
    U = u / u.norm(dim=0)  # (d_in, r)
    r = U.shape[1]
    eye = torch.eye(r, dtype=U.dtype, device=U.device)
    T_inv = torch.triu(U.t() @ U, diagonal=1) + 0.5 * eye
    T = torch.linalg.solve_triangular(T_inv, eye, upper=True)
    return U, U @ T


def update_factors(leaves: Leaves, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank 2r with R(u) − R(u0) = −B A; both factors are exact zeros where u = u0 (see above)."""
    U, UT = wy_factors(leaves["u"].to(dtype))
    U0, U0T0 = wy_factors(leaves["u0"].to(dtype))
    A = torch.cat([(U - U0).t(), U0.t()])  # (2r, d_in)
    B = torch.cat([UT, UT - U0T0], dim=1)  # (d_in, 2r)
    return A, B


def forward_input(x: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    # At least float32: the triangular solve has no bf16/fp16 kernel on CPU, and the factors stay exact zeros at init.
    A, B = update_factors(leaves, torch.promote_types(leaves["u"].dtype, torch.float32))
    return x - low_rank(x, A, B, 1.0)


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    A, B = update_factors(leaves, weight.dtype)
    return weight - (weight @ B) @ A, bias


def low_rank_factors(leaves: Leaves, site: Site, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """W R(u) − W R(u0) = (−W B) A, rank 2r: reads the base weight."""
    A, B = update_factors(leaves, leaves["u"].dtype)
    return -(weight().to(B.dtype) @ B), A


VARIANT = Variant(
    name="hra",
    config=HRAConfig,
    shapes=shapes,
    create=create,
    forward_input=forward_input,
    merge=merge,
    frozen=("u0",),
    kinds=LINEAR_LIKE,
    capabilities=(
        LowRank(low_rank_factors, reads_weight=True),
        PeftExchange("hra"),
        Recipe(lr=2e-3),
    ),
)
