"""`init` and `targets`: build an adapter for the modules a config selects."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._base import dense_weight
from ._calibration import collect_input_stats
from ._config import AdapterConfig, config_for
from ._params import SHARED, Params
from ._structure import check, declared_shapes
from ._targets import Target, find_targets
from ._variant import Init, Variant
from .variants import variant_for


def targets(model: nn.Module, cfg: AdapterConfig) -> list[Target]:
    """Dry run: the modules `cfg` would adapt, with shape and roles; nothing is built.

    >>> for t in lf.targets(model, lf.LoRAConfig(target_roles=("reader",))): print(t)
    """
    variant_for(cfg, caller="targets")
    found = find_targets(model, cfg, caller="targets")
    declared_shapes(cfg, tuple(found), "targets")  # rank limits are part of "would adapt"
    return found


def finish_leaves(
    variant: Variant,
    name: str,
    cfg: AdapterConfig,
    leaves: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Cast to `cfg.dtype`, move next to the base layer, check shapes, set requires_grad on trainable leaves."""
    if set(leaves) != set(expected):
        raise RuntimeError(
            f"variant {variant.name!r} created {sorted(leaves)} for {name!r}, declared {sorted(expected)}"
        )
    out = {}
    for leaf, shape in expected.items():
        tensor = leaves[leaf].detach().to(device=device, dtype=cfg.dtype)
        if tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"variant {variant.name!r} leaf {name}.{leaf}: shape {tuple(tensor.shape)} != {shape}")
        out[leaf] = tensor.contiguous().requires_grad_(leaf not in variant.frozen)
    return out


def init(
    model: nn.Module,
    cfg: AdapterConfig,
    *,
    calibration_data: Any = None,
    seed: int | None = None,
    progress: bool = True,
) -> Params:
    """Build the adapter pytree for every target `cfg` selects. `model` is not modified.

    `seed` makes random leaves reproducible (else torch's global RNG is used). `calibration_data` is an
    iterable of whole-model batches (same convention as `apply`'s `batch`), required by the data-driven
    variants (EVA, AntiPaSTO) and refused by the others; `progress` shows a bar over it.

    >>> params = lf.init(model, lf.LoRAConfig(r=8, alpha=16), seed=0)
    """
    variant = variant_for(cfg, caller="init")
    found = tuple(find_targets(model, cfg, caller="init"))
    shapes = declared_shapes(cfg, found, "init")  # validates ranks first
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    stats = {}
    if variant.calibrated:
        if calibration_data is None:
            raise ValueError(f"init: {type(cfg).__name__} needs `calibration_data` (an iterable of batches)")
        stats = collect_input_stats(model, found, calibration_data, caller="init", progress=progress)
        for target in found:
            seen = stats[target.path].count if target.path in stats else 0
            r = config_for(cfg, target.path).r
            if seen < r:
                raise ValueError(f"init: `calibration_data` gave {seen} tokens to {target.path!r}, fewer than `r`={r}")
        if variant.allocate is not None:  # e.g. EVA's rank redistribution: a refined config, fewer targets
            cfg, found = variant.allocate(found, cfg, stats)
            shapes = declared_shapes(cfg, found, "init")
    elif calibration_data is not None:
        raise ValueError(f"init: {type(cfg).__name__} takes no `calibration_data`")

    entries: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for target in found:
            module = model.get_submodule(target.path)
            device = module.weight.device
            ctx = Init(lambda m=module: dense_weight(m), generator, stats.get(target.path))
            leaves = variant.create(target, config_for(cfg, target.path), ctx)
            entries[target.path] = finish_leaves(variant, target.path, cfg, leaves, shapes[target.path], device)
        if variant.create_shared is not None:
            leaves = variant.create_shared(found, cfg, Init(lambda: None, generator))
            device = model.get_submodule(found[0].path).weight.device  # shared leaves sit with the first target
            entries[SHARED] = finish_leaves(variant, SHARED, cfg, leaves, shapes[SHARED], device)
    params = Params(entries, cfg, found)
    check(params, "init", stacked=False)
    return params
