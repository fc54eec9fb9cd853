"""C3A as PEFT's C3A: `c3a_kernel` (d_out / b, d_in / b, b) stored as lora_func holds it, on nn.Linear targets.

PEFT's `block_size` is one int for all targets (`block_size_pattern` unsupported here: it must be empty); lora_func's
None resolves per target (the largest b <= 256 dividing d_in and d_out). `to_peft` writes that int where it is the
same for every target and refuses the adapter, naming `block_size`, where targets resolve differently. PEFT's
`init_weights` acts at init only: any value is read (the kernels are in the file), and `true` is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .._config import AdapterConfig
from .._params import Params
from ..variants.c3a import LEAF, block_size
from ._method import PeftMethod


def one_block_size(params: Params) -> Params:
    cfg = params.config
    if cfg.block_size is not None:
        return params
    sizes = {block_size(t, cfg) for t in params.targets}
    if len(sizes) != 1:
        raise ValueError(
            f"to_peft: `block_size`=None resolves to {sorted(sizes)} on these targets, and PEFT's C3A has one "
            "`block_size` for all; set `block_size` to a divisor of every target's d_in and d_out"
        )
    fixed = dataclasses.replace(cfg, block_size=sizes.pop())
    return Params(dict(params.items()), fixed, params.targets)


def fields_out(cfg: AdapterConfig, written: Mapping[str, Any]) -> dict[str, Any]:
    return {"block_size": cfg.block_size}


def fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    value = fields.get("block_size", 256)  # PEFT's default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}: `block_size` must be a positive int, got {value!r}")
    return {"block_size": value}


METHOD = PeftMethod(
    variant="c3a",
    peft_type="C3A",
    keys={LEAF: LEAF},
    rank_fields=None,
    alpha_fields=None,
    required={"block_size_pattern": {}},
    inert={"init_weights": True},  # init-time only
    absent=("exclude_modules",),
    fields_out=fields_out,
    fields_in=fields_in,
    handled=("block_size",),
    export_as=one_block_size,
)
