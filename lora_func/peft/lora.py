"""LoRA as PEFT's LORA: `lora_A.weight` (r, d_in), `lora_B.weight` (d_out, r); rsLoRA and rank/alpha patterns."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._config import AdapterConfig
from ._method import REASONS, PeftMethod, flag, refuse

KEYS = {"A": "lora_A.weight", "B": "lora_B.weight"}
# LoraConfig fields lora_func expresses only at this value (PiSSA and DoRA share them).
REQUIRED = {
    "fan_in_fan_out": False,
    "use_dora": False,
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
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
    "lora_dropout": 0.0,  # dropout is off at inference; lora_func trains without it
    "megatron_core": "megatron.core",
    "qalora_group_size": 16,  # read only with use_qalora
    "loftq_config": {},  # read only with init_lora_weights="loftq" (refused)
    "eva_config": None,  # init-time only: EVA leaves the base weights alone
    "corda_config": None,
    "lora_ga_config": None,
}
# Initialisations that only choose the starting A, B: the saved A, B are all there is.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
HANDLED = ("use_rslora", "init_lora_weights")


def fields_out(cfg: AdapterConfig, written: Mapping[str, Any]) -> dict[str, Any]:
    return {"use_rslora": bool(getattr(cfg, "use_rslora", False)), "init_lora_weights": True}


def fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    init = fields.get("init_lora_weights", True)
    if not any(init is plain or (isinstance(init, str) and init == plain) for plain in PLAIN_INITS):
        refuse(where, "init_lora_weights", init, REASONS["init_lora_weights"])
    return {"use_rslora": flag(fields, "use_rslora", where)}


METHOD = PeftMethod(
    variant="lora",
    peft_type="LORA",
    keys=KEYS,
    required=REQUIRED,
    inert=INERT,
    fields_out=fields_out,
    fields_in=fields_in,
    handled=HANDLED,
)
