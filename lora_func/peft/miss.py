"""MiSS as PEFT's MISS: `miss_block` stored as lora_func holds it ((r, d_out), or (r, mini_r) with
`init_weights="mini"`), on nn.Linear targets; `r` (one for all targets: PEFT's MiSS has no `rank_pattern`),
`mini_r` and `init_weights` as PEFT names them. `init_weights="bat"` (another update rule) is refused."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .._config import AdapterConfig
from ._method import PeftMethod, refuse


def fields_out(cfg: AdapterConfig, written: Mapping[str, Any]) -> dict[str, Any]:
    return {"init_weights": cfg.init_weights, "mini_r": cfg.mini_r}


def fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    init = fields.get("init_weights", True)
    if init == "bat":
        refuse(where, "init_weights", init, "MiSS's 'bat' update (W's blocks times M) is not offered by lora_func")
    if init not in (True, False, "mini") or isinstance(init, int) and not isinstance(init, bool):
        raise ValueError(f'{where}: `init_weights` must be true, false or "mini", got {json.dumps(init)}')
    mini_r = fields.get("mini_r", 1)
    if isinstance(mini_r, bool) or not isinstance(mini_r, int) or mini_r <= 0:
        raise ValueError(f"{where}: `mini_r` must be a positive int, got {json.dumps(mini_r)}")
    return {"init_weights": init, "mini_r": mini_r}


METHOD = PeftMethod(
    variant="miss",
    peft_type="MISS",
    keys={"miss_block": "miss_block"},
    rank_fields=("r", None),
    alpha_fields=None,
    inert={"miss_dropout": 0.0},  # training only
    fields_out=fields_out,
    fields_in=fields_in,
    handled=("init_weights", "mini_r"),
)
