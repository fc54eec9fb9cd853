"""`init` and `targets`: build an adapter for the modules a config selects."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._base import dense_weight
from ._config import AdapterConfig
from ._params import SHARED, Params
from ._targets import Target, find_targets
from ._variant import Variant
from .variants import variant_for


def targets(model: nn.Module, cfg: AdapterConfig) -> list[Target]:
    """Dry run: the modules `cfg` would adapt, with shape and roles; nothing is built.

    >>> for t in lf.targets(model, lf.LoRAConfig(target_roles=("reader",))): print(t)
    """
    variant = variant_for(cfg, caller="targets")
    found = find_targets(model, cfg, caller="targets")
    for target in found:
        variant.shapes(target, cfg)  # rank limits are part of "would adapt"
    return found


def finish_leaves(
    variant: Variant, target: Target, cfg: AdapterConfig, leaves: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Cast to `cfg.dtype`, move next to the base layer, check shapes, set requires_grad on trainable leaves."""
    expected = variant.shapes(target, cfg)
    if set(leaves) != set(expected):
        raise RuntimeError(f"variant {variant.name!r} created leaves {sorted(leaves)}, declared {sorted(expected)}")
    out = {}
    for name in expected:
        tensor = leaves[name].detach().to(device=device, dtype=cfg.dtype)
        if tuple(tensor.shape) != tuple(expected[name]):
            raise RuntimeError(f"variant {variant.name!r} leaf {name!r}: shape {tuple(tensor.shape)} != {expected[name]}")
        out[name] = tensor.contiguous().requires_grad_(name not in variant.frozen)
    return out


def init(
    model: nn.Module,
    cfg: AdapterConfig,
    *,
    calibration_data: Any = None,
    seed: int | None = None,
) -> Params:
    """Build the adapter pytree for every target `cfg` selects. `model` is not modified.

    `seed` makes random leaves reproducible (else torch's global RNG is used). `calibration_data` is an
    iterable of whole-model batches, for the data-driven variants.

    >>> params = lf.init(model, lf.LoRAConfig(r=8, alpha=16), seed=0)
    """
    variant = variant_for(cfg, caller="init")
    if calibration_data is not None:
        raise ValueError(f"init: {type(cfg).__name__} takes no `calibration_data`")
    found = find_targets(model, cfg, caller="init")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    entries: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for target in found:
            module = model.get_submodule(target.path)
            variant.shapes(target, cfg)  # validates the rank before any work
            leaves = variant.create(target, cfg, lambda m=module: dense_weight(m), generator)
            entries[target.path] = finish_leaves(variant, target, cfg, leaves, module.weight.device)
    assert SHARED not in entries
    return Params(entries, cfg, tuple(found))
