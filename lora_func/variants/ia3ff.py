"""IA3-FF: a learned gain on each input feature of the base layer (IA3's feed-forward form).

    y' = (l ⊙ x) Wᵀ + b,     W' = W diag(l),  b' = b       (l: (d_in,))

An input transform, so it runs before any base layer, bitsandbytes included. The paper puts this gain
on the feed-forward block's inner activation, i.e. on the input of the down projection; select that with
`target_names` (e.g. `(r"down_proj$",)`). On a convolution l scales input channels (PEFT's (1, C, 1, ...));
merged, output channel o's kernel scales by the gains of its group's input channels. `r` and `alpha` are
unused. Identity at init: l = 1.
Liu et al. 2022, arXiv 2205.05638. Reference: peft/tuners/ia3/layer.py (`Linear`, `is_feedforward=True`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._config import AdapterConfig
from .._variant import LINEAR_LIKE, Dense, Init, Leaves, PeftExchange, Recipe, Site, Variant


@dataclass(frozen=True)
class IA3FFConfig(AdapterConfig):
    """IA3 on the input of each target (PEFT's IA3 on a module in `feedforward_modules`).
    `r` and `alpha` are unused."""


def shapes(target, cfg) -> dict[str, tuple[int, ...]]:
    return {"l": (target.d_in,)}


def create(target, cfg: IA3FFConfig, init: Init) -> Leaves:
    return {"l": torch.ones(target.d_in)}


def forward_input(x: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    return x * site.base.features(leaves["l"].to(x.dtype))


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    return weight * site.base.input_gain(leaves["l"].to(weight.dtype)), bias


VARIANT = Variant(
    name="ia3ff",
    config=IA3FFConfig,
    shapes=shapes,
    create=create,
    forward_input=forward_input,
    merge=merge,
    kinds=(*LINEAR_LIKE, "conv"),
    capabilities=(
        Dense(),
        PeftExchange("ia3ff"),
        Recipe(lr=2e-2),  # one gain per channel: a large lr
    ),
)
