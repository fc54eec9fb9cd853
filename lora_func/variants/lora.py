"""LoRA: y' = y + s · (x Aᵀ) Bᵀ, with s = alpha / r (alpha / √r with rsLoRA).

Identity at init: B = 0 (A is kaiming-uniform, as in PEFT).
Hu et al. 2021, arXiv 2106.09685; rsLoRA: Kalajdzievski 2023, arXiv 2312.03732.
Reference: peft/tuners/lora/layer.py (`Linear.forward`, `get_delta_weight`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._config import AdapterConfig
from .._targets import Target
from .._variant import Init, Leaves, Site, Variant, require_rank


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """LoRA. `use_rslora=True` scales by alpha / √r instead of alpha / r."""

    use_rslora: bool = False


def scale(cfg: AdapterConfig) -> float:
    if getattr(cfg, "use_rslora", False):
        return cfg.alpha / math.sqrt(cfg.r)
    return cfg.alpha / cfg.r


def shapes(target: Target, cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
    require_rank(target, cfg)
    return {"A": (cfg.r, target.d_in), "B": (target.d_out, cfg.r)}


def create(target: Target, cfg: AdapterConfig, init: Init) -> Leaves:
    A = torch.empty(cfg.r, target.d_in)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=init.generator)
    return {"A": A, "B": torch.zeros(target.d_out, cfg.r)}


def low_rank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """s · (x Aᵀ) Bᵀ, computed in x's dtype; the scale is applied on the (…, r) side where it is cheapest."""
    h = F.linear(x, A.to(x.dtype)) * s  # (..., r)
    return F.linear(h, B.to(x.dtype))  # (..., d_out)


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    return y + low_rank(x, leaves["A"], leaves["B"], scale(site.config)).to(y.dtype)


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    B, A = leaves["B"].to(weight.dtype), leaves["A"].to(weight.dtype)
    return weight + scale(site.config) * (B @ A), bias


VARIANT = Variant(name="lora", config=LoRAConfig, shapes=shapes, create=create, forward=forward, merge=merge)
