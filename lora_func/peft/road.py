"""ROAD as PEFT's ROAD: `road_theta` / `road_alpha` are lora_func's `theta` / `alpha`; `variant` maps one to one.

PEFT's `group_size` is one int for all targets (64 by default, also when the field is absent); lora_func's may be
None, which resolves per target to the largest power of two <= 64 dividing d_out. `to_peft` writes that int where
it is the same for every target (the same pairing, so the same function) and refuses the adapter, naming
`group_size`, where targets resolve differently; `from_peft` reads the int as it is.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from .._config import AdapterConfig
from .._params import Params
from ..variants import road as road_variant
from ._method import PeftMethod, describe

DEFAULTS = {"variant": "road_1", "group_size": 64}  # RoadConfig's defaults, for a file that omits them
ABSENT = ("exclude_modules", "layers_to_transform", "layers_pattern", "bias")  # RoadConfig has none of these


def one_group_size(params: Params) -> Params:
    """`params` with `group_size` an int: PEFT's RoadConfig has one for all targets, lora_func's None resolves per
    target (the largest power of two <= 64 dividing d_out). Same int everywhere: written as that int, which pairs
    every target's outputs exactly as before; different ones: refused, naming `group_size`."""
    cfg = params.config
    if cfg.group_size is not None:
        return params
    sizes = {t.path: road_variant.group_size(t, cfg) for t in params.targets}
    if len(set(sizes.values())) > 1:
        by_size: dict[int, list[str]] = {}
        for path, g in sizes.items():
            by_size.setdefault(g, []).append(path)
        found = "; ".join(f"{g} for {describe(paths)}" for g, paths in sorted(by_size.items(), reverse=True))
        common = math.gcd(*sizes.values())
        raise ValueError(
            f"to_peft: ROADConfig `group_size`=None resolves to different group sizes per target ({found}), and "
            f"PEFT's ROAD has one `group_size` for all targets; pairing differs with the group size, so this adapter "
            f"has no PEFT equivalent: train with an explicit `group_size` (e.g. {common}, which fits every target)"
        )
    return Params(dict(params.items()), dataclasses.replace(cfg, group_size=next(iter(sizes.values()))), params.targets)


def fields_out(cfg: AdapterConfig, written: Mapping[str, Any]) -> dict[str, Any]:
    return {"variant": cfg.variant, "group_size": cfg.group_size}


def fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    variant = fields.get("variant", DEFAULTS["variant"])
    group_size = fields.get("group_size", DEFAULTS["group_size"])
    if not isinstance(variant, str):
        raise ValueError(f"{where}: `variant` must be a string (road_1, road_2 or road_4), got {json.dumps(variant)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"{where}: `group_size` must be an int (PEFT's RoadConfig), got {json.dumps(group_size)}")
    return {"variant": variant, "group_size": group_size}


METHOD = PeftMethod(
    variant="road",
    peft_type="ROAD",
    keys={"theta": "road_theta", "alpha": "road_alpha"},
    rank_fields=None,
    alpha_fields=None,
    inert={"init_weights": True},  # init-time only: the saved angles and scales are all there is
    absent=ABSENT,
    fields_out=fields_out,
    fields_in=fields_in,
    handled=("variant", "group_size"),
    export_as=one_group_size,
)
