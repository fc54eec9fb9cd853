"""LoRA: y' = y + s · B A x, with s = alpha / r (alpha / √r with rsLoRA).

On a linear layer (and transformers' Conv1D) that is y + s · (x Aᵀ) Bᵀ with A (r, d_in), B (d_out, r); on a
convolution a conv A with the layer's kernel and a 1×1 conv B; on an embedding a lookup in Aᵀ then B; on fused
experts one A, B per expert (see `lora_func/kinds/`). Each kind computes the product, as PEFT's layers do.
`dropout` is PEFT's `lora_dropout`: the adapter's input, x in B A x, is dropped in training mode only.
Identity at init: B = 0 (A is kaiming-uniform, as in PEFT; on an embedding A = 0, B is normal, as in PEFT).
Hu et al. 2021, arXiv 2106.09685; rsLoRA: Kalajdzievski 2023, arXiv 2312.03732.
Reference: peft/tuners/lora/layer.py (`Linear`, `Conv2d`, `Embedding`, `ParamWrapper`; `get_delta_weight`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._config import AdapterConfig
from .._kind import Target
from .._variant import LINEAR_LIKE, Init, Leaves, LowRank, Padding, PeftExchange, Recipe, Site, Variant
from ..kinds import kind_of

# Every kind LoRA's product is defined on (`lora_func/kinds/`).
KINDS = (*LINEAR_LIKE, "conv", "embedding", "experts")


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """LoRA. `use_rslora=True` scales by alpha / √r instead of alpha / r. `dropout`: PEFT's `lora_dropout`, on
    the adapter's input in training mode (under `torch.func.vmap`, pass `randomness="different"` for
    independent masks per adapter)."""

    use_rslora: bool = False
    dropout: float = 0.0


def scale(cfg: AdapterConfig) -> float:
    if getattr(cfg, "use_rslora", False):
        return cfg.alpha / math.sqrt(cfg.r)
    return cfg.alpha / cfg.r


def input_dropout(x: torch.Tensor, site: Site) -> torch.Tensor:
    """x with PEFT's `lora_dropout` applied: only in training mode (the base layer's flag), only to a float input
    (an embedding's token ids are not dropped, as in PEFT). Returns x itself when nothing is dropped."""
    p = getattr(site.config, "dropout", 0.0)
    if p and site.base.training and x.is_floating_point():
        return F.dropout(x, p, training=True)
    return x


def shapes(target: Target, cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
    return kind_of(target).low_rank_shapes(target, cfg)


def create(target: Target, cfg: AdapterConfig, init: Init) -> Leaves:
    return kind_of(target).init_low_rank(target, cfg, init.generator)


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    return site.base.add_low_rank(y, input_dropout(x, site), leaves["A"], leaves["B"], scale(site.config))


def inference(site: Site, rows) -> Callable | None:
    """The target's forward in inference (an eval-mode layer, grad off), built once per injection: the fewest ops
    and Python frames between the hook and the kernels. Where kernels are small (decoding; a GPU) these calls are
    the adapter's whole cost per target and token. The same ops as `forward`'s inference path, so the same bits.

    With `rows` (a mixed batch), row i runs adapter rows.index[i] of the stacked (K, …) leaves: its A and B
    gathered (rows × r × (d_in + d_out) values, small next to the activations; none when row i uses adapter i),
    two batched matmuls, the add fused into the second; a base row's B is zero, so it gets y exactly.
    Linear layers only; a returned function gives None where dtypes differ (then `forward` runs)."""
    if site.target.kind not in LINEAR_LIKE:
        return None
    s = scale(site.config)
    linear, add = F.linear, torch.add
    if rows is None:

        def run(x: torch.Tensor, y: torch.Tensor, leaves: Leaves) -> torch.Tensor | None:
            A = leaves["A"]
            if A.dtype != x.dtype or y.dtype != x.dtype:
                return None
            return add(y, linear(linear(x, A), leaves["B"]), alpha=s)

        return run
    check, per_row, bmm, baddbmm = rows.check, rows.per_row, torch.bmm, torch.baddbmm

    def run_rows(x: torch.Tensor, y: torch.Tensor, stacked: Leaves) -> torch.Tensor | None:
        A = stacked["A"]
        if x.dim() < 2 or A.dtype != x.dtype or y.dtype != x.dtype:
            return None
        check(x, site)
        n = x.shape[0]
        h = bmm(x.reshape(n, -1, x.shape[-1]), per_row(A).mT)  # (n, T, r)
        out = baddbmm(y.reshape(n, -1, y.shape[-1]), h, per_row(stacked["B"]).mT, alpha=s)  # (n, T, d_out)
        return out.view(y.shape)

    return run_rows


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    B, A = leaves["B"].to(weight.dtype), leaves["A"].to(weight.dtype)
    return weight + scale(site.config) * site.base.low_rank_delta(A, B), bias


def low_rank_factors(leaves: Leaves, site: Site, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW = (s B) A."""
    return scale(site.config) * leaves["B"], leaves["A"]


VARIANT = Variant(
    name="lora",
    config=LoRAConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    inference=inference,
    merge=merge,
    kinds=KINDS,
    capabilities=(
        LowRank(low_rank_factors),
        Padding(axes=(("A", 0), ("B", 1))),
        PeftExchange("lora"),
        Recipe(lr=2e-3),
    ),
)
