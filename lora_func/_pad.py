"""Adapters of different ranks as adapters of one rank, for `stack(..., pad=True)`.

In the low-rank family the adapter enters as s · B A (PiSSA: s · (B A − B0 A0)). Zero rows appended to A
and zero columns to B leave B A unchanged, and B scaled by s_k / s changes the scale from the adapter's
own s_k to the stack's s; so every padded adapter computes exactly what it did, in every target. When
every adapter has the same scale (the usual alpha ∝ r, or rsLoRA with alpha ∝ √r) no B is scaled and
training the padded stack is training each adapter alone: the padded rows and columns get zero gradients
and stay zero under SGD and Adam. A variant declares which leaves carry the rank (`Padding` in its
`Variant.capabilities`); others have no such padding (DeLoRA normalises each rank component, HRA's reflections
and VeRA's shared projections are sized by r, ...), and are refused by name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from ._config import config_for
from ._params import Params
from ._transform import in_transform
from ._variant import Padding
from .variants import REGISTRY, variant_for
from .variants import lora as lora_variant

RANK_FIELDS = ("r", "alpha", "rank_pattern", "alpha_pattern")


def same_but_rank(a, b) -> bool:
    """Whether two configs differ at most in `r`, `alpha` and their per-target patterns (and the fields a config
    class names in `RANK_ALIASES`, which hold `r` under another name)."""
    if type(a) is not type(b):
        return False
    blank = {f: getattr(a, f) for f in (*RANK_FIELDS, *getattr(a, "RANK_ALIASES", ()))}  # AdaLoRA's `init_r`
    return dataclasses.replace(b, **blank) == a


def pad_ranks(adapters: Sequence[Params], caller: str = "stack") -> list[Params]:
    """The adapters (one variant, one set of targets, configs that differ in rank and alpha only) zero-padded to
    the largest rank of any of their targets, each computing exactly what it did; see the module docstring."""
    first = adapters[0]
    variant = variant_for(first.config, caller=caller)
    padding = variant.capability(Padding)
    if padding is None:
        paddable = [name for name, v in REGISTRY.items() if v.capability(Padding) is not None]
        raise ValueError(
            f"{caller}: adapters of variant {variant.name!r} with different ranks cannot be stacked: zero-padding to a "
            f"common rank is exact for the low-rank family only ({', '.join(paddable)})"
        )
    scales = [[lora_variant.scale(config_for(p.config, t.path)) for t in p.targets] for p in adapters]
    rank = max(config_for(p.config, t.path).r for p in adapters for t in p.targets)
    root = math.sqrt(rank) if getattr(first.config, "use_rslora", False) else rank
    config = dataclasses.replace(first.config, r=rank, alpha=scales[0][0] * root, rank_pattern=(), alpha_pattern=())
    s_stack = lora_variant.scale(config)  # the first adapter's scale (up to rounding)
    fresh = not in_transform()
    padded = []
    for p, row in zip(adapters, scales):
        entries = {path: dict(entry) for path, entry in p.items()}  # shared entries (none here today) as they are
        for target, s_k in zip(p.targets, row):
            factor = s_k / s_stack  # 1.0 exactly when the scales agree: then no factor is touched
            entry = entries[target.path]
            for leaf, axis in padding.axes:
                t = entry[leaf]
                value = t.detach() if fresh else t
                changed = False
                if leaf in padding.scaled and factor != 1.0:
                    value, changed = value * factor, True
                missing = rank - value.shape[axis]
                if missing:
                    shape = list(value.shape)
                    shape[axis] = missing
                    value, changed = torch.cat([value, value.new_zeros(shape)], dim=axis), True
                if changed and fresh:
                    value.requires_grad_(t.requires_grad)
                entry[leaf] = value if changed else t
        padded.append(Params(entries, config, p.targets, p.frozen))
    return padded
