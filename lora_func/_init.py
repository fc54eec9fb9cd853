"""`init` and `targets`: build an adapter for the modules a config selects."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._calibration import collect_input_stats, collect_weight_gradients
from ._config import AdapterConfig, config_for
from ._kind import Target
from ._merge import autocast_off
from ._params import SHARED, Params
from ._structure import check, declared_shapes, fits, growing_dims
from ._targets import find_targets
from ._variant import GradientCalibration, Init, Variant
from .kinds import create_leaves, device_of, frozen_leaves, locate, refuse_offloaded, site_for, variant_targets
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
    frozen: tuple[str, ...],
    larger: Mapping[str, tuple[int, ...]] = {},
) -> dict[str, torch.Tensor]:
    """One entry's leaves as `Params` hold them: copied (never a view into a file's buffer: CPU BLAS results depend
    on the data's alignment, and a loaded adapter must compute bitwise what the saved one did), cast to
    `cfg.dtype`, next to the base layer, of the declared shapes (`larger`: a shared leaf's dims that may exceed
    them), contiguous, trainable leaves (all but `frozen`) requiring grad; in the declaration's order."""
    if set(leaves) != set(expected):
        raise RuntimeError(f"variant {variant.name!r}: {sorted(leaves)} for {name!r}, declared {sorted(expected)}")
    out = {}
    for leaf, shape in expected.items():
        tensor = leaves[leaf].detach().to(device=device, dtype=cfg.dtype, copy=True)
        if not fits(tuple(tensor.shape), tuple(shape), larger.get(leaf, ())):
            raise RuntimeError(f"variant {variant.name!r} leaf {name}.{leaf}: shape {tuple(tensor.shape)} != {shape}")
        out[leaf] = tensor.contiguous().requires_grad_(leaf not in frozen)
    return out


def assemble(
    cfg: AdapterConfig,
    found: tuple[Target, ...],
    leaves: Mapping[str, dict[str, torch.Tensor]],
    model: nn.Module | None,
    caller: str,
) -> Params:
    """The one way `init`, `load` and `from_peft` make `Params` from the leaves of every entry (`{path: {leaf:
    tensor}}`, the shared entry included): entries in declaration order (targets in order, shared last), each
    leaf as `finish_leaves` makes it, next to its base layer in `model` (shared leaves with the first adapted target;
    on the CPU without a model), then the structure check."""
    variant = variant_for(cfg, caller=caller)
    declared = declared_shapes(cfg, found, caller)
    grows = growing_dims(cfg, found) if SHARED in declared else {}
    by_path = {t.path: t for t in found}
    adapted = variant_targets(found)
    modules = dict(model.named_modules()) if model is not None else None
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for entry, shapes in declared.items():
        device = torch.device("cpu")
        if model is not None:
            device = device_of(locate(model, adapted[0] if entry == SHARED else by_path[entry], caller, modules))
        frozen = frozen_leaves(variant, entry, by_path)
        larger = grows if entry == SHARED else {}
        entries[entry] = finish_leaves(variant, entry, cfg, leaves[entry], shapes, device, frozen, larger)
    params = Params(entries, cfg, found)
    check(params, caller, stacked=False, model=model, modules=modules)
    return params


def init(
    model: nn.Module,
    cfg: AdapterConfig,
    *,
    calibration_data: Any = None,
    calibration_loss: Any = None,
    seed: int | None = None,
    progress: bool = True,
) -> Params:
    """Build the adapter pytree for every target `cfg` selects. `model` is not modified.

    `seed` makes random leaves reproducible (else torch's global RNG is used). `calibration_data` is an
    iterable of whole-model batches (same convention as `apply`'s `batch`), required by the data-driven
    variants (EVA, AntiPaSTO, LoRA-GA) and refused by the others; `progress` shows a bar over it.
    `calibration_loss(model, batch) -> scalar`: the training loss of one batch, for the variants initialised
    from gradients (LoRA-GA); by default the model's output's `loss` (a Hugging Face model given `labels`).

    >>> params = lf.init(model, lf.LoRAConfig(r=8, alpha=16), seed=0)
    """
    variant = variant_for(cfg, caller="init")
    found = tuple(find_targets(model, cfg, caller="init"))
    refuse_offloaded(model, "init")
    declared_shapes(cfg, found, "init")  # validates ranks and kinds first
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    stats = {}
    adapted = variant_targets(found)  # all but saved module copies
    if variant.calibrated:
        if calibration_data is None:
            raise ValueError(f"init: {type(cfg).__name__} needs `calibration_data` (an iterable of batches)")
        if variant.capability(GradientCalibration) is not None:
            stats = collect_weight_gradients(
                model, adapted, calibration_data, calibration_loss, caller="init", progress=progress
            )
        elif calibration_loss is not None:
            raise ValueError(f"init: {type(cfg).__name__} calibrates on layer inputs: it takes no `calibration_loss`")
        else:
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
    elif calibration_data is not None:
        raise ValueError(f"init: {type(cfg).__name__} takes no `calibration_data`")
    elif calibration_loss is not None:
        raise ValueError(f"init: {type(cfg).__name__} takes no `calibration_loss`")
    gradients = variant.capability(GradientCalibration) is not None

    leaves: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad(), autocast_off({"cpu"} | {p.device.type for p in model.parameters()}):
        for target in found:
            site = site_for(model, target, cfg, "init")
            data = stats.get(target.path)
            ctx = Init(
                lambda s=site: s.base.weight(),
                generator,
                None if gradients else data,
                lambda s=site: s.base.bias,
                data if gradients else None,
            )
            leaves[target.path] = create_leaves(variant, site, ctx)
        if variant.create_shared is not None and adapted:
            leaves[SHARED] = variant.create_shared(adapted, cfg, Init(lambda: None, generator))
        return assemble(cfg, found, leaves, model, "init")
