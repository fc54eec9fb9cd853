"""DoRA as PEFT's LORA with `use_dora=True`: A, B and `lora_magnitude_vector` are stored.

lora_func's frozen ‖W_i‖² is not: it is rebuilt from the model's (dequantized) weight on import, as `lf.init`
computes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .._base import dense_weight
from .._config import AdapterConfig
from .._variant import Leaves
from ..variants import dora as dora_variant
from . import lora, pissa
from ._method import PeftMethod

KEYS = {**lora.KEYS, "magnitude": "lora_magnitude_vector"}


def is_dora(fields: Mapping[str, Any], paths: list[str], where: str) -> bool:
    return fields.get("use_dora") is True and not pissa.is_pissa(fields, paths, where)


def rebuild(module: nn.Module, cfg: AdapterConfig, leaves: Leaves) -> Leaves:
    return {"weight_sq_norm": dora_variant.squared_row_norms(dense_weight(module))}


METHOD = PeftMethod(
    variant="dora",
    peft_type="LORA",
    keys=KEYS,
    required={**lora.REQUIRED, "use_dora": True},
    inert=lora.INERT,
    fields_out=lora.fields_out,
    fields_in=lora.fields_in,
    handled=lora.HANDLED,
    claims=is_dora,
    rebuild=rebuild,
)
