"""AntiPaSTO: learned singular-value deltas and a block Cayley rotation inside a top-r SVD subspace.

    W = U S Vᵀ;  pick r singular directions I by calibration:  score_i = S_i · √(v_iᵀ XᵀX v_i / n)
    W'(α) = W + U_I [diag(S_I + α δ) R(α) − diag(S_I)] V_Iᵀ
    R(α) = ⊕_b (I − α A_b / 2)⁻¹ (I + α A_b / 2),   A_b = c · tanh(skew(θ_b) / c),  c = 2 tan(max_angle / 2)

r/block_size blocks of size block_size, each a Cayley rotation of a skew-symmetric matrix whose
entries are soft-clamped (tanh) to ±c: a 2×2 block then turns by at most `max_rotation_angle`, larger
blocks by an angle of that order (the reference's clamp, entrywise, not on eigen-angles). The
rotation acts on the selected right singular vectors (the input side), as the paper's default; U_I
stays fixed. `alpha` is the steering coefficient α: 1 as trained, −1 the reversed intervention
(R(−α) = R(α)⁻¹ exactly with Cayley), 0 the base model.

The selected directions are those that are both strong in W (S_i) and excited by the calibration
inputs (the RMS of x·v_i), a Wanda-style weight × activation score; it is computed from the shared
calibration pass's XᵀX, so it uses the RMS where the reference implementation uses the mean |x·v_i|.
U_I, S_I, V_I are frozen leaves from the dequantized weight: W is never rewritten (the paper keeps a
W_res = W − U_I S_I V_Iᵀ instead), so bnb bases work.
Identity at init: θ = 0 gives R = I exactly and δ = 0, so the core diag(S+αδ)R − diag(S) is exactly 0
(the reference adds small noise to δ and θ to break a ±α symmetry its steering loss needs).
Clark 2026, arXiv 2601.07473; reference: github.com/wassname/AntiPaSTO (peft_utils/antipasto_adapter.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._config import AdapterConfig
from .._kind import Target
from .._variant import LINEAR_LIKE, Init, InputStats, Leaves, LowRank, Recipe, Site, Variant, require_rank
from . import ssvd


@dataclass(frozen=True)
class AntiPaSTOConfig(AdapterConfig):
    """AntiPaSTO. `r`: directions adapted (a multiple of `block_size`); `alpha`: the steering coefficient α
    (1 as trained, −1 reversed, 0 off). `max_rotation_angle`: soft bound per block in radians (None: no bound).
    Needs `calibration_data` at `init`."""

    alpha: float = 1.0
    block_size: int = 4
    max_rotation_angle: float | None = math.pi / 3

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 2:
            raise ValueError(f"{name}: `block_size` must be an int >= 2, got {bs!r}")
        if self.r % bs:
            raise ValueError(f"{name}: `r`={self.r} must be a multiple of `block_size`={bs}")
        angle = self.max_rotation_angle
        if angle is not None and (
            isinstance(angle, bool) or not isinstance(angle, (int, float)) or not 0 < angle < math.pi
        ):
            raise ValueError(f"{name}: `max_rotation_angle` must be None or in (0, π), got {angle!r}")
        if angle is not None:
            object.__setattr__(self, "max_rotation_angle", float(angle))


def shapes(target: Target, cfg: AntiPaSTOConfig) -> dict[str, tuple[int, ...]]:
    require_rank(target, cfg)
    r, bs = cfg.r, cfg.block_size
    return {
        "U": (target.d_out, r),
        "S": (r,),
        "Vh": (r, target.d_in),
        "delta_s": (r,),
        "theta": (r // bs, bs * (bs - 1) // 2),
    }


def activation_score(stats: InputStats) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """score(S, Vh) = S ⊙ RMS of the calibration inputs along each right singular vector."""

    def score(S: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
        V = Vh.to(stats.gram.device, torch.float64)
        energy = ((V @ stats.gram) * V).sum(1) / stats.count  # mean (x · v_i)², (k,)
        return S.to(torch.float64) * energy.clamp(min=0).sqrt().to(S.device)

    return score


def create(target: Target, cfg: AntiPaSTOConfig, init: Init) -> Leaves:
    r, bs = cfg.r, cfg.block_size
    frozen = ssvd.principal(init.weight(), r, activation_score(init.inputs))
    return {**frozen, "delta_s": torch.zeros(r), "theta": torch.zeros(r // bs, bs * (bs - 1) // 2)}


def rotation(theta: torch.Tensor, cfg: AntiPaSTOConfig) -> torch.Tensor:
    """R(α), the (r, r) block-diagonal Cayley rotation; solved in float32 at least."""
    n, bs = theta.shape[0], cfg.block_size
    A = ssvd.skew(theta.to(torch.promote_types(theta.dtype, torch.float32)), bs)  # (n, bs, bs)
    if cfg.max_rotation_angle is not None:
        limit = 2 * math.tan(cfg.max_rotation_angle / 2)
        A = limit * torch.tanh(A / limit)
    blocks = ssvd.cayley(-cfg.alpha / 2 * A)  # (I − αA/2)⁻¹ (I + αA/2), (n, bs, bs)
    eye = torch.eye(n, dtype=blocks.dtype, device=blocks.device)
    return torch.einsum("nab,nm->namb", blocks, eye).reshape(n * bs, n * bs).to(theta.dtype)


def _core(leaves: Leaves, cfg: AntiPaSTOConfig) -> torch.Tensor:
    return ssvd.core(leaves["S"], cfg.alpha * leaves["delta_s"], rotation(leaves["theta"], cfg))


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    return y + ssvd.low_rank_core(x, leaves, _core(leaves, site.config)).to(y.dtype)


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    f = {k: v.to(weight.dtype) for k, v in leaves.items()}
    return weight + f["U"] @ _core(f, site.config) @ f["Vh"], bias


def low_rank_factors(leaves: Leaves, site: Site, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW = (U M) Vh, M the r × r core."""
    return leaves["U"] @ _core(leaves, site.config), leaves["Vh"]


VARIANT = Variant(
    name="antipasto",
    config=AntiPaSTOConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    frozen=("U", "S", "Vh"),
    calibrated=True,
    kinds=LINEAR_LIKE,
    capabilities=(
        LowRank(low_rank_factors),
        # r directions with ~r·(block_size + 1) values per layer are too few at the demo's r = 8
        Recipe(lr=2e-2, options=(("r", 32),)),
    ),
)
