"""SHiRA as PEFT's SHIRA: `shira_weight` (n,) stored as lora_func holds it, on nn.Linear targets; `r` (one for all
targets: PEFT's SHiRA has no `rank_pattern`) and `random_seed` as PEFT names them. PEFT also stores each target's
`shira_indices` (2, n): written from the random mask lora_func computes, and on import checked to be that mask (a
mask from a custom `mask_fn` is refused)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .._config import AdapterConfig
from ..variants.shira import indices
from ._method import PeftMethod


def fields_out(cfg: AdapterConfig, written: Mapping[str, Any]) -> dict[str, Any]:
    return {"random_seed": cfg.random_seed}


def fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    seed = fields.get("random_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"{where}: `random_seed` must be an int >= 0 or null, got {json.dumps(seed)}")
    return {"random_seed": seed}


METHOD = PeftMethod(
    variant="shira",
    peft_type="SHIRA",
    keys={"shira_weight": "shira_weight"},
    rank_fields=("r", None),
    alpha_fields=None,
    required={"mask_type": "random", "fan_in_fan_out": False},
    inert={"init_weights": True},  # init-time only
    absent=("exclude_modules", "layers_to_transform", "layers_pattern", "bias"),
    fields_out=fields_out,
    fields_in=fields_in,
    handled=("random_seed",),
    derived={"shira_indices": indices},
)
