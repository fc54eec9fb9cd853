"""VeRA as PEFT's VERA: per-target `vera_lambda_b`/`vera_lambda_d`, shared `base_model.vera_A`/`vera_B`.

`to_peft` always writes the projections (PEFT's `save_projection=True`). A file saved with `save_projection=False`
holds only the per-target vectors; its projections are regenerated from `projection_prng_key` as `lf.init` draws
them, which is PEFT's draw.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._config import AdapterConfig
from ._method import PeftMethod, flag


def fields_out(cfg: AdapterConfig, written: Mapping[str, Any]) -> dict[str, Any]:
    return {"projection_prng_key": cfg.projection_prng_key, "d_initial": cfg.d_initial, "save_projection": True}


def fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    flag(fields, "save_projection", where)
    return {name: fields[name] for name in ("projection_prng_key", "d_initial") if name in fields}


METHOD = PeftMethod(
    variant="vera",
    peft_type="VERA",
    keys={"lambda_b": "vera_lambda_b", "lambda_d": "vera_lambda_d"},
    rank_fields=("r", None),
    alpha_fields=None,
    required={"fan_in_fan_out": False},
    inert={"vera_dropout": 0.0, "init_weights": True},  # training-only dropout; init-time only
    absent=("exclude_modules",),
    fields_out=fields_out,
    fields_in=fields_in,
    handled=("projection_prng_key", "d_initial", "save_projection"),
    shared_keys={"A": "base_model.vera_A", "B": "base_model.vera_B"},
    shared_stored=lambda fields: fields.get("save_projection", True) is True,
)
