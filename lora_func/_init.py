"""`init` and `targets`: build an adapter for the modules a config selects."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._calibration import collect_input_stats
from ._config import AdapterConfig, config_for
from ._kind import Target
from ._params import SHARED, Params
from ._structure import check, declared_shapes
from ._targets import find_targets
from ._variant import Init, Variant
from .kinds import create_leaves, device_of, frozen_leaves, refuse_offloaded, site_for, variant_targets
from .variants import variant_for


def targets(model: nn.Module, cfg: AdapterConfig) -> list[Target]:
    """Dry run: the modules `cfg` would adapt, with shape and roles; nothing is built.

    >>> for t in lf.targets(model, lf.LoRAConfig(target_roles=("reader",))): print(t)
    """
    variant_for(cfg, caller="targets")
    found = find_targets(model, cfg, caller="targets")
    declared_shapes(cfg, tuple(found), "targets")  # rank limits and the kinds a variant adapts: part of "would adapt"
    return found


def finish_leaves(
    variant: Variant,
    name: str,
    cfg: AdapterConfig,
    leaves: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    device: torch.device,
    frozen: tuple[str, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """Cast to `cfg.dtype`, move next to the base layer, check shapes, set requires_grad on trainable leaves
    (all but `frozen`, by default the variant's)."""
    frozen = variant.frozen if frozen is None else frozen
    if set(leaves) != set(expected):
        raise RuntimeError(
            f"variant {variant.name!r} created {sorted(leaves)} for {name!r}, declared {sorted(expected)}"
        )
    out = {}
    for leaf, shape in expected.items():
        tensor = leaves[leaf].detach().to(device=device, dtype=cfg.dtype)
        if tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"variant {variant.name!r} leaf {name}.{leaf}: shape {tuple(tensor.shape)} != {shape}")
        out[leaf] = tensor.contiguous().requires_grad_(leaf not in frozen)
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
    refuse_offloaded(model, "init")
    shapes = declared_shapes(cfg, found, "init")  # validates ranks and kinds first
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    stats = {}
    adapted = variant_targets(found)  # all but saved module copies
    if variant.calibrated:
        if calibration_data is None:
            raise ValueError(f"init: {type(cfg).__name__} needs `calibration_data` (an iterable of batches)")
        stats = collect_input_stats(model, adapted, calibration_data, caller="init", progress=progress)
        for target in adapted:
            seen = stats[target.path].count if target.path in stats else 0
            r = config_for(cfg, target.path).r
            if seen < r:
                raise ValueError(f"init: `calibration_data` gave {seen} tokens to {target.path!r}, fewer than `r`={r}")
        if variant.allocate is not None:  # e.g. EVA's rank redistribution: a refined config, fewer targets
            cfg, kept = variant.allocate(adapted, cfg, stats)
            found = tuple(t for t in found if t in kept or t not in adapted)
            adapted = variant_targets(found)
            shapes = declared_shapes(cfg, found, "init")
    elif calibration_data is not None:
        raise ValueError(f"init: {type(cfg).__name__} takes no `calibration_data`")

    entries: dict[str, dict[str, torch.Tensor]] = {}
    targets_by_path = {t.path: t for t in found}
    with torch.no_grad():
        for target in found:
            site = site_for(model, target, cfg, "init")
            ctx = Init(lambda s=site: s.base.weight(), generator, stats.get(target.path))
            leaves = create_leaves(variant, site, ctx)
            frozen = frozen_leaves(variant, target.path, targets_by_path)
            entries[target.path] = finish_leaves(
                variant, target.path, cfg, leaves, shapes[target.path], device_of(site.base), frozen
            )
        if variant.create_shared is not None and adapted:
            leaves = variant.create_shared(adapted, cfg, Init(lambda: None, generator))
            device = device_of(site_for(model, adapted[0], cfg, "init").base)  # shared leaves sit with the first target
            entries[SHARED] = finish_leaves(variant, SHARED, cfg, leaves, variant.shared_shapes(adapted, cfg), device)
    params = Params(entries, cfg, found)
    check(params, "init", stacked=False)
    return params
