"""HRA as PEFT's HRA: `hra_u` (d_in, r) stored; lora_func's frozen u0 rebuilt on import.

PEFT stores `hra_u` only and computes W R(u); lora_func computes W (R(u) − R(u0) + I) with a frozen copy u0 of
the initial u, whose columns come in equal pairs, so R(u0) = I. `to_peft` checks that u0 is so paired; `from_peft`
rebuilds u0 from u's even columns, each twice: PEFT's symmetric init, and u itself while u is still at its init.
"""

from __future__ import annotations

import torch
from torch import nn

from .._config import AdapterConfig
from .._params import Params
from .._variant import Leaves
from ._method import PeftMethod


def paired(u: torch.Tensor) -> torch.Tensor:
    """u's even columns, each twice: (d_in, r) with columns in equal pairs, so R(u) = I."""
    return u[:, 0::2].repeat_interleave(2, dim=1)


def checked(params: Params) -> Params:
    for path, leaves in params.items():
        if not torch.equal(leaves["u0"], paired(leaves["u0"])):
            raise ValueError(
                f"to_peft: HRA leaf {path}.u0 does not have its columns in equal pairs, so R(u0) is not the "
                "identity and PEFT (which stores u only) would not compute what lora_func does"
            )
    return params


def rebuild(module: nn.Module, cfg: AdapterConfig, leaves: Leaves) -> Leaves:
    return {"u0": paired(leaves["u"])}


METHOD = PeftMethod(
    variant="hra",
    peft_type="HRA",
    keys={"u": "hra_u"},
    rank_fields=("r", None),
    alpha_fields=None,
    required={"apply_GS": False},
    inert={"init_weights": True},  # init-time only: u0 is rebuilt paired whatever u started from
    export_as=checked,
    rebuild=rebuild,
)
