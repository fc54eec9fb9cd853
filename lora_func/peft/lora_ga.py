"""LoRA-GA as PEFT's LORA, written as the equivalent rank-2r LoRA (PiSSA's export, `pissa.as_lora`).

PEFT's LoRA-GA rewrites the base weight to W − s·B0A0 and saves A, B with `init_lora_weights="lora_ga"`. lora_func
keeps W and computes y + s·(BA − B0A0)x, exactly a rank-2r LoRA with A' = [A; A0], B' = [B, −B0]. `to_peft` writes
that LoRA (r and alpha doubled, rsLoRA alpha times √2): what PEFT's own
`save_pretrained(path_initial_model_for_weight_conversion=...)` writes, loadable on the original base model.
`from_peft` refuses an unconverted LoRA-GA checkpoint: its A0, B0 come from calibration gradients the files do not
hold (PEFT itself loads it only onto the saved residual model); the converted one reads as a LoRA.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import lora
from ._method import PeftMethod
from .pissa import as_lora


def is_lora_ga(fields: Mapping[str, Any], paths: list[str], where: str) -> bool:
    return fields.get("init_lora_weights") == "lora_ga"


def fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    raise ValueError(
        f'{where}: a LoRA-GA checkpoint (`init_lora_weights`="lora_ga") holds A, B for PEFT\'s residual base weight '
        "W − s·B0A0, and B0, A0 come from calibration gradients that it does not hold: save it with PEFT's "
        "`save_pretrained(path_initial_model_for_weight_conversion=...)`, which writes a LoRA that `from_peft` reads "
        "on the original model"
    )


METHOD = PeftMethod(
    variant="lora_ga",
    peft_type="LORA",
    keys=lora.KEYS,
    required=lora.REQUIRED,
    inert=lora.INERT,
    fields_in=fields_in,
    handled=lora.HANDLED,
    claims=is_lora_ga,
    export_as=as_lora,
    kinds=("linear", "conv1d"),
)
