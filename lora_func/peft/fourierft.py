"""FourierFT as PEFT's FOURIERFT: `fourierft_spectrum` (n,) stored as lora_func holds it, on nn.Linear and
transformers Conv1D targets (`fan_in_fan_out`); `n_frequency`, `scaling` and `random_loc_seed` as PEFT names them.
The frequencies' positions are not stored (PEFT draws them from `random_loc_seed`, as lora_func does).
`n_frequency_pattern` (per-target counts) is not offered."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .._config import AdapterConfig
from ._fields import number
from ._method import PeftMethod


def fields_out(cfg: AdapterConfig, written: Mapping[str, Any]) -> dict[str, Any]:
    return {"n_frequency": cfg.n_frequency, "scaling": cfg.scaling, "random_loc_seed": cfg.random_loc_seed}


def fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    seed = fields.get("random_loc_seed", 777)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{where}: `random_loc_seed` must be an int >= 0, got {json.dumps(seed)}")
    return {
        "n_frequency": number(fields.get("n_frequency", 1000), "`n_frequency`", where, rank=True),
        "scaling": number(fields.get("scaling", 150.0), "`scaling`", where, rank=False),
        "random_loc_seed": seed,
    }


METHOD = PeftMethod(
    variant="fourierft",
    peft_type="FOURIERFT",
    keys={"fourierft_spectrum": "fourierft_spectrum"},
    rank_fields=None,
    alpha_fields=None,
    required={"fan_in_fan_out": False, "n_frequency_pattern": {}},
    inert={"init_weights": True},  # init-time only
    fields_out=fields_out,
    fields_in=fields_in,
    handled=("n_frequency", "scaling", "random_loc_seed"),
    kinds=("linear", "conv1d"),
)
