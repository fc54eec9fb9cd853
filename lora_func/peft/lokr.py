"""LoKr as PEFT's LOKR: `lokr_w1` or `lokr_w1_a`/`lokr_w1_b`, `lokr_w2` or `lokr_w2_a`/`lokr_w2_b` per target (the
same choice PEFT makes from the shapes and rank), stored as lora_func holds them, on nn.Linear and nn.Conv2d targets.
`decompose_both` and `decompose_factor` translated; PEFT's LoKr has no `bias` field and no transformers Conv1D layer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._config import AdapterConfig
from ..variants.lokr import LEAVES
from ._method import PeftMethod, flag


def fields_out(cfg: AdapterConfig, written: Mapping[str, Any]) -> dict[str, Any]:
    return {"decompose_both": cfg.decompose_both, "decompose_factor": cfg.decompose_factor}


def fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    factor = fields.get("decompose_factor", -1)
    if isinstance(factor, bool) or not isinstance(factor, int):
        raise ValueError(f"{where}: `decompose_factor` must be an int, got {factor!r}")
    return {"decompose_both": flag(fields, "decompose_both", where), "decompose_factor": factor}


METHOD = PeftMethod(
    variant="lokr",
    peft_type="LOKR",
    keys={leaf: leaf for leaf in LEAVES},
    alpha_fields=("alpha", "alpha_pattern"),
    required={"use_effective_conv2d": False},  # convolutions only (CP-decomposed kernels), which lora_func's LoKr lacks
    inert={
        "rank_dropout": 0.0,  # training only
        "module_dropout": 0.0,  # training only
        "rank_dropout_scale": False,  # training only
        "init_weights": True,  # init-time only ("lycoris" too: the stored leaves are all there is)
    },
    fields_out=fields_out,
    fields_in=fields_in,
    handled=("decompose_both", "decompose_factor"),
    absent=("bias",),
    kinds=("linear", "conv"),
    conv_dims=(2,),
)
