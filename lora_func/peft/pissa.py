"""PiSSA as PEFT's LORA with `init_lora_weights="pissa"`; written as the equivalent rank-2r LoRA.

PEFT rewrites the base weight to W − s·B0A0 and saves A, B. lora_func keeps W and computes
y + s·(BA − B0A0)x, which is exactly a rank-2r LoRA with A' = [A; A0], B' = [B, −B0]. `to_peft` writes
that LoRA (r and alpha doubled, rsLoRA alpha times √2, patterns likewise): PEFT's own export convention
(`save_pretrained(path_initial_model_for_weight_conversion=...)`), loadable on the original base model.
`from_peft` reads a PEFT checkpoint saved with `init_lora_weights="pissa"` (unconverted, to be loaded on
the original base model) as lora_func PiSSA, rebuilding A0, B0 from the model's weight as PEFT does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._base import dense_weight
from .._config import AdapterConfig
from .._params import Params
from .._variant import Leaves
from ..variants import pissa as pissa_variant
from ..variants.lora import LoRAConfig
from . import lora
from ._method import PeftMethod, flag, refuse


def is_pissa(fields: Mapping[str, Any], paths: list[str], where: str) -> bool:
    init = fields.get("init_lora_weights")
    return isinstance(init, str) and init.startswith("pissa")


def fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    init = fields["init_lora_weights"]
    niter = None
    if init != "pissa":
        match = re.fullmatch(r"pissa_niter_(\d+)", init)
        if match is None:
            refuse(where, "init_lora_weights", init, "PiSSA inits are 'pissa' and 'pissa_niter_<n>'")
        niter = int(match.group(1))
    return {"use_rslora": flag(fields, "use_rslora", where), "niter": niter}


def rebuild(module: nn.Module, cfg: AdapterConfig, leaves: Leaves) -> Leaves:
    # PEFT's `pissa_init` on the original weight, as PEFT runs it again when it loads the checkpoint.
    A0, B0 = pissa_variant.principal_factors(dense_weight(module), cfg)
    return {"A0": A0, "B0": B0}


def as_lora(params: Params) -> Params:
    """PiSSA's y + s·(BA − B0A0)x as the rank-2r LoRA A' = [A; A0], B' = [B, −B0] with the same scale."""
    cfg = params.config
    factor = math.sqrt(2.0) if cfg.use_rslora else 2.0  # keeps alpha / r (or alpha / √r) at twice the rank
    lora_cfg = LoRAConfig(
        r=2 * cfg.r,
        alpha=cfg.alpha * factor,
        dtype=cfg.dtype,
        target_roles=cfg.target_roles,
        target_names=cfg.target_names,
        exclude_names=cfg.exclude_names,
        layers=cfg.layers,
        rank_pattern=tuple((p, 2 * r) for p, r in cfg.rank_pattern),
        alpha_pattern=tuple((p, a * factor) for p, a in cfg.alpha_pattern),
        use_rslora=cfg.use_rslora,
    )
    entries = {}
    for path, leaves in params.items():
        A = torch.cat([leaves["A"].detach(), leaves["A0"].detach()], dim=0)  # (2r, d_in)
        B = torch.cat([leaves["B"].detach(), -leaves["B0"].detach()], dim=1)  # (d_out, 2r)
        entries[path] = {"A": A, "B": B}
    return Params(entries, lora_cfg, params.targets)


METHOD = PeftMethod(
    variant="pissa",
    peft_type="LORA",
    keys=lora.KEYS,
    required=lora.REQUIRED,
    inert=lora.INERT,
    fields_in=fields_in,
    handled=lora.HANDLED,
    claims=is_pissa,
    export_as=as_lora,
    rebuild=rebuild,
)
