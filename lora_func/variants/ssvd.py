"""SSVD: rotate the top-r right singular vectors of W and shift their singular values; U stays fixed.

    W = U Σ Vᵀ                                              (SVD of the dequantized base weight)
    W' = U (Σ + ΔΣ) diag(G, I) Vᵀ                           (the paper's W' = U (Σ+ΔΣ) G Vᵀ)
       = W + U_r [diag(S_r + δ) G − diag(S_r)] V_rᵀ         (what runs: a rank-r correction)
    G = (I − K)(I + K)⁻¹ = Cayley(K),  K = −Kᵀ  (r × r)       orthogonal for every K

Only the top-r input ("listening") directions rotate, within their own span, and their singular
values shift; the output directions U stay as they are. Trainable: δ (r) and the r(r−1)/2 entries
above K's diagonal. U_r, S_r, V_r are frozen leaves computed once from the dequantized weight, so
the base weight is never rewritten and bnb bases work. G is the exact Cayley transform (a linear
solve; the reference is described as using a truncated Neumann series for speed), so it is orthogonal
to float precision.
Identity at init: K = 0 gives G = I exactly and δ = 0, so the core diag(S+δ)G − diag(S) is exactly 0.
`r` is the number of rotated directions; `alpha` is not used.
Wang, Watanabe, Van hamme 2025, arXiv 2509.02830 (SSVD); reference implementation in ESPnet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._config import AdapterConfig
from .._kind import Target
from .._variant import LINEAR_LIKE, Init, Leaves, LowRank, Recipe, Site, Variant, require_rank


@dataclass(frozen=True)
class SSVDConfig(AdapterConfig):
    """SSVD. `r` >= 2: how many top right singular vectors rotate (r(r−1)/2 + r trainable values per
    layer). `alpha` is not used."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 2:
            raise ValueError(f"SSVDConfig: `r` must be >= 2 (a rotation needs two directions), got {self.r}")
        if self.alpha_pattern:
            raise ValueError("SSVDConfig: `alpha_pattern` must be empty: SSVD has no scale")


def skew(upper: torch.Tensor, n: int) -> torch.Tensor:
    """The n × n skew-symmetric K whose strict upper triangle is `upper` (row-major), K = −Kᵀ.

    Built out of place (scatter), so torch.func transforms and vmap go through it.
    """
    rows, cols = torch.triu_indices(n, n, offset=1, device=upper.device)
    flat = upper.new_zeros(*upper.shape[:-1], n * n).scatter(-1, (rows * n + cols).expand_as(upper), upper)
    K = flat.reshape(*upper.shape[:-1], n, n)
    return K - K.transpose(-1, -2)


def cayley(K: torch.Tensor) -> torch.Tensor:
    """(I + K)⁻¹ (I − K) = (I − K)(I + K)⁻¹: orthogonal for skew-symmetric K (batched over leading dims)."""
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    return torch.linalg.solve(eye + K, eye - K)


def principal(weight: torch.Tensor, r: int, score: Callable | None = None) -> Leaves:
    """Frozen U (d_out, r), S (r,), Vh (r, d_in) of `weight`: its top-r singular triplets, or the r with
    the highest `score(S, Vh)` (kept in singular-value order)."""
    U, S, Vh = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
    if score is None:
        index = torch.arange(r, device=S.device)
    else:
        index = torch.topk(score(S, Vh), r).indices.sort().values
    return {"U": U[:, index], "S": S[index], "Vh": Vh[index]}


def core(S: torch.Tensor, shift: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """M = diag(S + shift) G − diag(S), (r, r): W' − W = U M Vh."""
    return (S + shift)[:, None] * G - torch.diag(S)


def low_rank_core(x: torch.Tensor, leaves: Leaves, M: torch.Tensor) -> torch.Tensor:
    """x Vhᵀ Mᵀ Uᵀ, in x's dtype: the rank-r correction U M Vh applied to x."""
    dtype = x.dtype
    h = F.linear(x, leaves["Vh"].to(dtype))  # (..., r)
    h = F.linear(h, M.to(dtype))  # (..., r)
    return F.linear(h, leaves["U"].to(dtype))  # (..., d_out)


def rotation(leaves: Leaves) -> torch.Tensor:
    """G = Cayley(K), (r, r); solved in float32 at least (half-precision solves are not available everywhere)."""
    K = leaves["K"]
    return cayley(skew(K.to(torch.promote_types(K.dtype, torch.float32)), leaves["S"].shape[0])).to(K.dtype)


def shapes(target: Target, cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
    require_rank(target, cfg)
    r = cfg.r
    return {"U": (target.d_out, r), "S": (r,), "Vh": (r, target.d_in), "delta_s": (r,), "K": (r * (r - 1) // 2,)}


def create(target: Target, cfg: SSVDConfig, init: Init) -> Leaves:
    r = cfg.r
    return {**principal(init.weight(), r), "delta_s": torch.zeros(r), "K": torch.zeros(r * (r - 1) // 2)}


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    M = core(leaves["S"], leaves["delta_s"], rotation(leaves))
    return y + low_rank_core(x, leaves, M).to(y.dtype)


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    f = {k: v.to(weight.dtype) for k, v in leaves.items()}
    M = core(f["S"], f["delta_s"], rotation(f))
    return weight + f["U"] @ M @ f["Vh"], bias


def low_rank_factors(leaves: Leaves, site: Site, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW = (U M) Vh, M the r × r core."""
    return leaves["U"] @ core(leaves["S"], leaves["delta_s"], rotation(leaves)), leaves["Vh"]


VARIANT = Variant(
    name="ssvd",
    config=SSVDConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    frozen=("U", "S", "Vh"),
    kinds=LINEAR_LIKE,
    capabilities=(
        LowRank(low_rank_factors),
        Recipe(lr=2e-2),  # few values (singular-value shifts, a rotation): a large lr
    ),
)
