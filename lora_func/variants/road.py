"""ROAD (RoAd): a learned 2×2 rotation and scale of pairs of output features.

    y' = R y,   R block-diagonal in 2×2 blocks over pairs of output features

With the output split into groups of g = `group_size` and element i of a group paired with element
i + g/2 (PEFT's layout, as in rotary embeddings):

    y'ᵢ = c₁ᵢ · yᵢ − c₂ᵢ · yⱼ,     y'ⱼ = c₁ⱼ · yⱼ + c₂ⱼ · yᵢ       (i in the first half, j = i + g/2)

    road_1: c₁ = α cos θ, c₂ = α sin θ, one (θ, α) per pair, shared by both elements   (d_out/2 each)
    road_2: c₁ = α cos θ, c₂ = α sin θ, one (θ, α) per element                         (d_out each)
    road_4: c₁ = α₁ cos θ₁, c₂ = α₂ sin θ₂, two angles and two scales per element       (2·d_out each)

The bias is rotated too (the output is), so merging gives W' = R W, b' = R b.
Identity at init: θ = 0, α = 1, so c₁ = 1 and c₂ = 0.
Petrushkov et al. 2024, arXiv 2409.00119. Reference: peft/tuners/road/layer.py (`_apply_road`,
`_prepare_cols`); leaf names `theta`, `alpha` hold PEFT's `road_theta`, `road_alpha` as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._config import AdapterConfig
from .._kind import Target
from .._variant import LINEAR_LIKE, Dense, Init, Leaves, PeftExchange, Recipe, Site, Variant

VARIANTS = {"road_1": 1, "road_2": 2, "road_4": 4}  # name -> leaf size in units of d_out / 2


@dataclass(frozen=True)
class ROADConfig(AdapterConfig):
    """ROAD. `variant`: "road_1", "road_2" or "road_4" (PEFT's names; parameters per output pair 2, 4, 8).

    `group_size`: elements i and i + group_size/2 of each group of the output form a rotated pair.
    It must be even and divide every target's d_out, as in PEFT (default 64 there). None (the default
    here) takes, per target, the largest power of two up to 64 that divides d_out, so small layers
    (a 32-wide k_proj) need no setting; pairing order does not change what ROAD can learn.
    `r` and `alpha` are not used: ROAD has no rank and no scale; its size is set by `variant`.
    """

    variant: str = "road_1"
    group_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.variant not in VARIANTS:
            raise ValueError(f"{name}: `variant` must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        for field in ("rank_pattern", "alpha_pattern"):
            if getattr(self, field):
                raise ValueError(f"{name}: `{field}` must be empty: ROAD has no rank and no scale")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g % 2):
            raise ValueError(f"{name}: `group_size` must be None or a positive even int, got {g!r}")


def group_size(target: Target, cfg: ROADConfig) -> int:
    """The pairing group of `target`: `cfg.group_size`, or the largest power of two <= 64 dividing d_out."""
    g = cfg.group_size if cfg.group_size is not None else math.gcd(64, target.d_out)
    if g < 2 or target.d_out % g:
        raise ValueError(
            f"ROADConfig: `group_size`={cfg.group_size} does not fit {target.path!r}: "
            f"d_out={target.d_out} must be a multiple of an even group size"
        )
    return g


def shapes(target: Target, cfg: ROADConfig) -> dict[str, tuple[int, ...]]:
    group_size(target, cfg)
    size = target.d_out // 2 * VARIANTS[cfg.variant]
    return {"theta": (size,), "alpha": (size,)}


def create(target: Target, cfg: ROADConfig, init: Init) -> Leaves:
    size = shapes(target, cfg)["theta"]
    return {"theta": torch.zeros(size), "alpha": torch.ones(size)}


def coefficients(theta: torch.Tensor, alpha: torch.Tensor, variant: str, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(c₁, c₂), each (d_out,): the diagonal and the off-diagonal of R."""
    if variant == "road_1":  # one (θ, α) per pair: repeat each group's g/2 values for both halves
        theta = theta.reshape(-1, 1, g // 2).expand(-1, 2, -1).reshape(-1)
        alpha = alpha.reshape(-1, 1, g // 2).expand(-1, 2, -1).reshape(-1)
    if variant == "road_4":  # per group: g values for c₁, then g values for c₂
        theta = theta.reshape(-1, 2, g)
        alpha = alpha.reshape(-1, 2, g)
        return (alpha[:, 0] * theta[:, 0].cos()).reshape(-1), (alpha[:, 1] * theta[:, 1].sin()).reshape(-1)
    return alpha * theta.cos(), alpha * theta.sin()


def rotate(y: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, g: int) -> torch.Tensor:
    """R y along the last dimension: y c₁ + rotate_half(y) c₂, with rotate_half(y₁, y₂) = (−y₂, y₁) per group."""
    halves = y.reshape(*y.shape[:-1], -1, 2, g // 2)  # (..., groups, 2, g/2)
    swapped = torch.stack((-halves[..., 1, :], halves[..., 0, :]), dim=-2).reshape(y.shape)
    return y * c1 + swapped * c2


def _apply_road(y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    g = group_size(site.target, site.config)
    c1, c2 = coefficients(leaves["theta"], leaves["alpha"], site.config.variant, g)
    return rotate(y, c1, c2, g)


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    # As PEFT: the rotation runs in the leaves' dtype, the result goes back to the layer's.
    return _apply_road(y.to(leaves["theta"].dtype), leaves, site).to(y.dtype)


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    f = {k: v.to(weight.dtype) for k, v in leaves.items()}
    new_weight = _apply_road(weight.T, f, site).T  # R W: rotate each column of W as an output vector
    return new_weight, None if bias is None else _apply_road(bias, f, site)


VARIANT = Variant(
    name="road",
    config=ROADConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    kinds=LINEAR_LIKE,
    capabilities=(
        Dense(),
        PeftExchange("road"),
        Recipe(lr=5e-3),
    ),
)
