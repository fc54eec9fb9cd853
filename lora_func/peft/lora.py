"""LoRA as PEFT's LORA: `lora_A.weight` (r, d_in), `lora_B.weight` (d_out, r); rsLoRA and rank/alpha patterns."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .._config import AdapterConfig
from ._fields import written as json_value
from ._method import REASONS, PeftMethod, flag, refuse

KEYS = {"A": "lora_A.weight", "B": "lora_B.weight"}
# LoraConfig fields lora_func expresses only at this value (PiSSA and DoRA share them).
REQUIRED = {
    "fan_in_fan_out": False,  # written by default; `from_peft` reads it per layer, as PEFT does (`_kinds.py`)
    "use_dora": False,
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,  # written by default; fused experts (`_kinds.py`)
    "trainable_token_indices": None,
    "ensure_weight_tying": False,
    "use_qalora": False,
    "megatron_config": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "use_bdlora": None,
    "velora_config": None,
    "monteclora_config": None,
    "kasa_config": None,
}
INERT = {
    "megatron_core": "megatron.core",
    "qalora_group_size": 16,  # read only with use_qalora
    "loftq_config": {},  # read only with init_lora_weights="loftq" (refused)
    "eva_config": None,  # init-time only: EVA leaves the base weights alone
    "corda_config": None,
    "lora_ga_config": None,
}
# Initialisations that only choose the starting A, B: the saved A, B are all there is.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
HANDLED = ("use_rslora", "init_lora_weights", "lora_dropout")
# The layer kinds PEFT's LoRA adapts as lora_func's does (see `_kinds.py`).
KINDS = ("linear", "conv1d", "conv", "embedding", "experts")


def fields_out(cfg: AdapterConfig, written: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "use_rslora": bool(getattr(cfg, "use_rslora", False)),
        "init_lora_weights": True,
        "lora_dropout": json_value(cfg.dropout),
    }


def dropout_in(fields: Mapping[str, Any], where: str) -> float:
    """PEFT's `lora_dropout` (0 when absent): lora_func's `dropout`."""
    value = fields.get("lora_dropout", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{where}: `lora_dropout` must be a number in [0, 1), got {json.dumps(value)}")
    return float(value)


def fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    init = fields.get("init_lora_weights", True)
    if not any(init is plain or (isinstance(init, str) and init == plain) for plain in PLAIN_INITS):
        refuse(where, "init_lora_weights", init, REASONS["init_lora_weights"])
    return {"use_rslora": flag(fields, "use_rslora", where), "dropout": dropout_in(fields, where)}


METHOD = PeftMethod(
    variant="lora",
    peft_type="LORA",
    keys=KEYS,
    required=REQUIRED,
    inert=INERT,
    fields_out=fields_out,
    fields_in=fields_in,
    handled=HANDLED,
    kinds=KINDS,
)
