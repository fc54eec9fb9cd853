"""PSOFT as PEFT's PSOFT: `psoft_R.weight` (q, or the free (r, r) matrix) and the vectors `psoft_R.vector_a` /
`psoft_R.vector_b` where enabled, stored as lora_func's `psoft_R`, `vector_a`, `vector_b`, on nn.Linear targets.

PEFT's file holds no A and B: PEFT rebuilds them from the base weight when it loads, and so does `from_peft` here
(the same SVD call, so the same factors). `psoft_alpha` is lora_func's `alpha`, `psoft_dropout` its `dropout`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .._config import AdapterConfig
from .._kind import BaseLayer
from .._variant import Leaves
from ..variants import psoft as psoft_variant
from ._method import PeftMethod, flag

FIELDS = (  # PEFT's fields with lora_func's names and meaning, besides `psoft_dropout`
    "ab_svd_init",
    "psoft_svd",
    "psoft_svd_lowrank_niter",
    "random_seed",
    "psoft_orth",
    "psoft_mag_b",
    "psoft_mag_a",
    "use_cayley_neumann",
    "num_cayley_neumann_terms",
    "cayley_neumann_eps",
)
DEFAULTS = {name: psoft_variant.PSOFTConfig.__dataclass_fields__[name].default for name in FIELDS}


def fields_out(cfg: AdapterConfig, written: Mapping[str, Any]) -> dict[str, Any]:
    return {**{name: getattr(cfg, name) for name in FIELDS}, "psoft_dropout": cfg.dropout}


def fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for name in FIELDS:
        value = fields.get(name, DEFAULTS[name])
        if isinstance(DEFAULTS[name], bool):
            value = flag({name: value}, name, where)
        out[name] = value
    dropout = fields.get("psoft_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{where}: `psoft_dropout` must be a number in [0, 1), got {json.dumps(dropout)}")
    return {**out, "dropout": float(dropout)}


def rebuild(base: BaseLayer, cfg: AdapterConfig, leaves: Leaves) -> Leaves:
    A, B = psoft_variant.principal_factors(base.weight(), cfg)
    return {"A": A.to(cfg.dtype), "B": B.to(cfg.dtype)}


METHOD = PeftMethod(
    variant="psoft",
    peft_type="PSOFT",
    keys={"psoft_R": "psoft_R.weight", "vector_a": "psoft_R.vector_a", "vector_b": "psoft_R.vector_b"},
    rank_fields=("r", None),
    alpha_fields=("psoft_alpha", None),
    required={"fan_in_fan_out": False},
    inert={"init_weights": True},  # init-time only
    absent=("bias",),
    fields_out=fields_out,
    fields_in=fields_in,
    handled=(*FIELDS, "psoft_dropout"),
    rebuild=rebuild,
)
