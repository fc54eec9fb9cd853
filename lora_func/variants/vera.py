"""VeRA: frozen random projections shared by all targets, with per-target trainable scaling vectors.

    y' = y + λ_b ⊙ ((λ_d ⊙ (x A_sᵀ)) B_sᵀ),     W' = W + diag(λ_b) B_s diag(λ_d) A_s

A (r, max d_in) and B (max d_out, r) are frozen, stored once in the adapter (the shared entry, as with
PEFT's `save_projection=True`), and each target uses the slices A_s = A[:, :d_in], B_s = B[:d_out, :].
They are kaiming-uniform from a generator seeded with `projection_prng_key`, A drawn first, exactly as
PEFT draws them. This is LoRA's low-rank product with A' = diag(λ_d) A_s and B' = diag(λ_b) B_s, scale 1.
`r` is the projections' rank (one for all targets); `alpha` is unused.
Identity at init: λ_b = 0 (λ_d = `d_initial`).
Kopiczko et al. 2023, arXiv 2310.11454. Reference: peft/tuners/vera/layer.py, model.py (`_init_vera_A_vera_B`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._config import AdapterConfig
from .._kind import Target
from .._variant import LINEAR_LIKE, Init, Leaves, LowRank, PeftExchange, Recipe, Site, Variant
from ..kinds.linear import add_low_rank


@dataclass(frozen=True)
class VeRAConfig(AdapterConfig):
    """VeRA. `r`: rank of the shared projections. `alpha`: unused. `d_initial`: initial λ_d.
    `projection_prng_key`: seed of the shared projections (independent of `init`'s `seed`, as in PEFT)."""

    d_initial: float = 0.1
    projection_prng_key: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)):
            raise TypeError(f"VeRAConfig: `d_initial` must be a number, got {self.d_initial!r}")
        object.__setattr__(self, "d_initial", float(self.d_initial))
        key = self.projection_prng_key
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise ValueError(f"VeRAConfig: `projection_prng_key` must be an int >= 0, got {key!r}")
        if self.rank_pattern:
            raise ValueError("VeRAConfig: `rank_pattern` must be empty: all targets share the projections' rank `r`")


def shapes(target: Target, cfg: VeRAConfig) -> dict[str, tuple[int, ...]]:
    return {"lambda_b": (target.d_out,), "lambda_d": (cfg.r,)}


def create(target: Target, cfg: VeRAConfig, init: Init) -> Leaves:
    return {"lambda_b": torch.zeros(target.d_out), "lambda_d": torch.full((cfg.r,), cfg.d_initial)}


def shared_shapes(targets: tuple[Target, ...], cfg: VeRAConfig) -> dict[str, tuple[int, ...]]:
    return {"A": (cfg.r, max(t.d_in for t in targets)), "B": (max(t.d_out for t in targets), cfg.r)}


def create_shared(targets: tuple[Target, ...], cfg: VeRAConfig, init: Init) -> Leaves:
    generator = torch.Generator().manual_seed(cfg.projection_prng_key)
    leaves = {}
    for name, shape in shared_shapes(targets, cfg).items():  # A, then B: PEFT's draw order
        leaves[name] = torch.nn.init.kaiming_uniform_(torch.empty(shape), a=0, generator=generator)
    return leaves


def factors(leaves: Leaves, site: Site) -> tuple[torch.Tensor, torch.Tensor]:
    """(diag(λ_d) A_s, diag(λ_b) B_s): the LoRA factors this target's VeRA update amounts to."""
    A = leaves["A"][:, : site.target.d_in] * leaves["lambda_d"][:, None]  # (r, d_in)
    B = leaves["B"][: site.target.d_out, :] * leaves["lambda_b"][:, None]  # (d_out, r)
    return A, B


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    A, B = factors(leaves, site)
    return add_low_rank(y, x, A, B, 1.0)  # the add fused into the second product


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    A, B = factors(leaves, site)
    return weight + B.to(weight.dtype) @ A.to(weight.dtype), bias


def low_rank_factors(leaves: Leaves, site: Site, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW = (diag(λ_b) B_s) (diag(λ_d) A_s)."""
    A, B = factors(leaves, site)
    return B, A


VARIANT = Variant(
    name="vera",
    config=VeRAConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    frozen=("A", "B"),
    shared_shapes=shared_shapes,
    create_shared=create_shared,
    kinds=LINEAR_LIKE,
    capabilities=(
        LowRank(low_rank_factors),
        PeftExchange("vera"),
        Recipe(lr=3e-2),  # few, multiplicative values: a large lr
    ),
)
