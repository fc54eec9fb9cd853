"""OFT (v2): the input rotated by a block-diagonal orthogonal matrix before the base layer.

    n = blocks · b          n = d_in (a convolution: its fan-in d_in / groups · ∏kernel); b = `oft_block_size`, or,
                             with `oft_block_size=0`, blocks = `r`; either moved to the nearest divisor of n where it
                             does not divide it, as PEFT does
    Q_i = skew(q_i)          q_i (b(b−1)/2,) the strict upper triangle of block i, Q_i = U − Uᵀ
    R_i = I + 2Q_i + 2Q_i² + … + 2Q_i^(n−2) + Q_i^(n−1)     Cayley–Neumann, n = `num_cayley_neumann_terms` >= 4
          (the truncated series of the Cayley transform (I + Q)(I − Q)⁻¹; PEFT's loop gives I, I + 2Q and
          I + 2Q + 2Q² + Q³ for n = 1, 2, 3, and so does this file; `use_cayley_neumann=False`: the exact
          (I − Q)(I + Q)⁻¹ by a solve, as PEFT computes it)
    x' = x · diag(R_0, …, R_{blocks−1})   per block of b input features;   y' = x' Wᵀ + b,   W' = W Rᵀ

On linear-like layers it is an input transform, run before any base layer, bitsandbytes included. On a convolution
R rotates each kernel's fan-in (W read as (d_out, n), channel-major as PEFT's `view`): the kernel W' = W Rᵀ is built
and the layer's own convolution runs with it (PEFT's `Conv2d.merge`; its unmerged forward agrees on 1×1 kernels, see
lora_func/peft/oft.py). `block_share=True` stores one block,
used for all (PEFT's). Identity at init: q = 0, so every R_i is exactly I (PEFT's `init_weights=True`).
The sums are accumulated in PEFT's order (`_cayley_batch`), so outputs and gradients are PEFT's to rounding.
PEFT's `coft` (projecting q in place during the forward) and `module_dropout` are not offered.
Qiu et al. 2023, arXiv 2306.07280; OFT v2: Qiu et al. 2025, arXiv 2506.19847.
Reference: peft/tuners/oft/layer.py (`OFTRotationModule._cayley_batch`, `forward`, `Linear.merge`, `Conv2d`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._config import AdapterConfig
from .._kind import Target
from .._variant import LINEAR_LIKE, Dense, Init, Leaves, PeftExchange, Recipe, Site, Variant
from ..kinds.conv import convolve, fan_in


@dataclass(frozen=True)
class OFTConfig(AdapterConfig):
    """OFT (PEFT's `OFTConfig`, v2). `oft_block_size` (PEFT's default 32) per target, the nearest divisor of its
    d_in (a convolution's fan-in) where it does not divide it (as PEFT); with `oft_block_size=0`, `r` is the number
    of blocks instead (likewise), else `r` is unused, as in PEFT where exactly one of the two is set.
    `init_weights=False` draws q ~ N(0, 0.1²) (not the identity)."""

    oft_block_size: int = 32
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.oft_block_size < 0 or self.num_cayley_neumann_terms < 1:
            raise ValueError(
                f"OFTConfig: `oft_block_size` must be >= 0 and `num_cayley_neumann_terms` >= 1, got "
                f"{self.oft_block_size} and {self.num_cayley_neumann_terms}"
            )
        if self.rank_pattern or self.alpha_pattern:
            raise ValueError("OFTConfig: `rank_pattern` / `alpha_pattern` are not supported (one block size for all)")


def nearest_divisor(d_in: int, value: int) -> int:
    """The divisor of d_in PEFT uses for a block size (or block count) that does not divide it: the nearest one,
    the smaller on a tie; d_in itself for a value above it (PEFT's `adjust_oft_parameters`, step for step)."""
    if value >= d_in:
        return d_in
    higher = value
    while higher <= d_in and d_in % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and d_in % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def features(target: Target) -> int:
    """n, the features R rotates: d_in, or a convolution's fan-in (d_in / groups · ∏kernel)."""
    return fan_in(target) if target.kind == "conv" else target.d_in


def blocks(target: Target, cfg: OFTConfig) -> tuple[int, int]:
    """(number of blocks, block size) for this target: `oft_block_size`, or n / `r` blocks (n: `features`), each moved
    to the nearest divisor of n where it does not divide it, as PEFT does (PEFT warns; `lf.targets` shows the result
    through the leaf shapes)."""
    d_in = features(target)
    if cfg.oft_block_size:
        size = cfg.oft_block_size if d_in % cfg.oft_block_size == 0 else nearest_divisor(d_in, cfg.oft_block_size)
        return d_in // size, size
    count = cfg.r if d_in % cfg.r == 0 and cfg.r <= d_in else nearest_divisor(d_in, cfg.r)
    return count, d_in // count


def shapes(target: Target, cfg: OFTConfig) -> dict[str, tuple[int, ...]]:
    count, size = blocks(target, cfg)
    return {"oft_R": (1 if cfg.block_share else count, size * (size - 1) // 2)}


def create(target: Target, cfg: OFTConfig, init: Init) -> Leaves:
    shape = shapes(target, cfg)["oft_R"]
    if cfg.init_weights:
        return {"oft_R": torch.zeros(shape)}
    return {"oft_R": torch.normal(0.0, 0.1, shape, generator=init.generator)}


def skew(q: torch.Tensor, size: int) -> torch.Tensor:
    """(k, b(b−1)/2) -> (k, b, b): U − Uᵀ with U's strict upper triangle q (row-major, as PEFT's `triu_indices`)."""
    rows, cols = torch.triu_indices(size, size, 1, device=q.device)
    upper = torch.zeros(size, size, q.shape[0], dtype=q.dtype, device=q.device).index_put((rows, cols), q.t())
    upper = upper.permute(2, 0, 1).contiguous()  # blocks first in memory: the series' bmm then runs on whole blocks
    return upper - upper.transpose(-2, -1)


def cayley(Q: torch.Tensor) -> torch.Tensor:
    """(I − Q)(I + Q)⁻¹ of skew blocks Q (..., b, b), by a solve (PEFT's exact Cayley in OFT and BOFT; PSOFT's
    (I + Q)(I − Q)⁻¹ is `cayley(−Q)`, bit for bit). Half-precision blocks are solved in float32, as PEFT solves them
    (LU has no half types), and returned in their dtype."""
    dtype = Q.dtype
    Q = Q.float() if dtype in (torch.float16, torch.bfloat16) else Q
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device).expand(Q.shape)
    return torch.linalg.solve(eye + Q, eye - Q, left=False).to(dtype)


def neumann(Q: torch.Tensor, terms: int) -> torch.Tensor:
    """The truncated Cayley–Neumann series I + 2Q + … + 2Q^(n−2) + Q^(n−1) of skew blocks Q (..., b, b), n = `terms`
    (PEFT's `_cayley_batch` in OFT, and PSOFT's: the same sums in the same order, `add` with alpha as PEFT's `add_`,
    so the same bits)."""
    R = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device).expand(Q.shape)
    if terms > 1:
        R = torch.add(R, Q, alpha=2.0)
        if terms > 2:
            power = Q @ Q
            R = torch.add(R, power, alpha=2.0)
            for _ in range(3, terms - 1):
                power = power @ Q
                R = torch.add(R, power, alpha=2.0)
            power = power @ Q
            R = R + power
    return R


def rotations(q: torch.Tensor, size: int, cfg: OFTConfig) -> torch.Tensor:
    """The orthogonal blocks R (k, b, b) of q (k, b(b−1)/2), in q's dtype."""
    Q = skew(q, size)
    return neumann(Q, cfg.num_cayley_neumann_terms) if cfg.use_cayley_neumann else cayley(Q)


def rotate_blocks(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """x · diag(R_0, …, R_{k−1}) for blocks R (k, b, b), x's last axis k·b features, in R's dtype."""
    count, size = R.shape[0], R.shape[-1]
    xr = x.to(R.dtype).reshape(*x.shape[:-1], count, size)
    return torch.einsum("...rk,rkc->...rc", xr, R).reshape(x.shape)


def _blocks_of(leaves: Leaves, site: Site) -> tuple[torch.Tensor, int, int]:
    count, size = blocks(site.target, site.config)
    R = rotations(leaves["oft_R"], size, site.config)
    if site.config.block_share:
        R = R.expand(count, size, size)
    return R, count, size


def forward_input(x: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    R, _, _ = _blocks_of(leaves, site)
    return rotate_blocks(x, R).to(x.dtype)


def merged_weight(weight: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    """W' = W Rᵀ, (d_out, n), in the weight's dtype: each row rotated by the blocks transposed."""
    R, _, _ = _blocks_of({k: v.to(weight.dtype) for k, v in leaves.items()}, site)
    return rotate_blocks(weight, R.transpose(-1, -2))


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    """A convolution: the layer's own convolution with the kernel W' = W Rᵀ (its output y is not used)."""
    base = site.base
    W = merged_weight(base.weight(), leaves, site)
    b = None if base.bias is None else base.bias.to(W.dtype)
    return convolve(base, x.to(W.dtype), W, b).to(y.dtype)


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    return merged_weight(weight, leaves, site), bias


VARIANT = Variant(
    name="oft",
    config=OFTConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    forward_input=forward_input,
    merge=merge,
    kinds=(*LINEAR_LIKE, "conv"),
    capabilities=(
        Dense(),
        PeftExchange("oft"),
        Recipe(lr=5e-4),
    ),
)
