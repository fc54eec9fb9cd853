"""IA3: a learned gain on each output feature of the base layer.

    y' = l ⊙ y = l ⊙ (x Wᵀ + b),     W' = diag(l) W,  b' = l ⊙ b       (l: (d_out,))

The bias is scaled too, as in PEFT. On a convolution l scales output channels (PEFT's (1, C, 1, ...)).
`r` and `alpha` are unused. Identity at init: l = 1.
Liu et al. 2022, arXiv 2205.05638. Reference: peft/tuners/ia3/layer.py (`Linear`, `Conv2d`, `is_feedforward=False`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._config import AdapterConfig
from .._variant import LINEAR_LIKE, Dense, Init, Leaves, PeftExchange, Recipe, Site, Variant


@dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """IA3 on the output of each target (PEFT's IA3 on a module not in `feedforward_modules`).
    `r` and `alpha` are unused."""


def shapes(target, cfg) -> dict[str, tuple[int, ...]]:
    return {"l": (target.d_out,)}


def create(target, cfg: IA3Config, init: Init) -> Leaves:
    return {"l": torch.ones(target.d_out)}


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    return y * site.base.features(leaves["l"].to(y.dtype))


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    gain = leaves["l"].to(weight.dtype)
    return gain[:, None] * weight, None if bias is None else gain * bias


VARIANT = Variant(
    name="ia3",
    config=IA3Config,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    kinds=(*LINEAR_LIKE, "conv"),
    capabilities=(
        Dense(),
        PeftExchange("ia3"),
        Recipe(lr=2e-2),  # one gain per channel: a large lr
    ),
)
