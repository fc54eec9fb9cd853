"""BOFT as PEFT's BOFT: `boft_R` (factors, blocks, b, b) and `boft_s` ((d_out, 1) on nn.Linear, (1, d_out) on
nn.Conv2d), stored under lora_func's leaves of the same names and shapes.

PEFT computes `boft_n_butterfly_factor` only where its CUDA extension compiles, and 1 elsewhere (its file then holds
one factor whatever the config says): such a file is refused by the shape check, and a file lora_func writes with
more than one factor loads only in a PEFT that has the extension. PEFT's Conv2d layer reads square kernels, one
stride and one padding, groups 1, as it builds its kernel from `kernel_size[0]`, `stride[0]`, `padding[0]`: other
convolutions are refused. `boft_dropout` drops blocks in training only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._config import AdapterConfig
from ._method import PeftMethod
from .oft import _int as _count


def fields_out(cfg: AdapterConfig, written: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "boft_block_size": cfg.boft_block_size,
        "boft_block_num": cfg.boft_block_num,
        "boft_n_butterfly_factor": cfg.boft_n_butterfly_factor,
    }


def fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    return {
        "boft_block_size": _count(fields, "boft_block_size", 4, where),
        "boft_block_num": _count(fields, "boft_block_num", 0, where),
        "boft_n_butterfly_factor": _count(fields, "boft_n_butterfly_factor", 1, where),
    }


def check_convolutions(targets, where: str) -> None:
    """PEFT's Conv2d reads one kernel size, stride and padding (the first of each) and refuses groups > 1."""
    for t in targets:
        if t.kind != "conv":
            continue
        layout = dict(t.layout)
        if (
            layout["groups"] != 1
            or not isinstance(layout["padding"], tuple)
            or any(len(set(layout[k])) != 1 for k in ("kernel_size", "stride", "padding"))
        ):
            raise ValueError(
                f"{where}: {t.path!r} ({t.module}) has kernel_size={layout['kernel_size']}, stride={layout['stride']}, "
                f"padding={layout['padding']}, groups={layout['groups']}; PEFT's BOFT Conv2d reads square kernels, one "
                "stride and one padding, groups 1, so it would not compute what lora_func does"
            )


def checked(params):
    check_convolutions(params.targets, "to_peft")
    return params


METHOD = PeftMethod(
    variant="boft",
    peft_type="BOFT",
    keys={"boft_R": "boft_R", "boft_s": "boft_s"},
    rank_fields=None,
    alpha_fields=None,
    required={"fan_in_fan_out": False},
    inert={
        "boft_dropout": 0.0,  # training only
        "init_weights": True,  # init-time only
    },
    fields_out=fields_out,
    fields_in=fields_in,
    handled=("boft_block_size", "boft_block_num", "boft_n_butterfly_factor"),
    kinds=("linear", "conv"),
    conv_dims=(2,),
    export_as=checked,
    check_model=lambda model, targets, where: check_convolutions(targets, where),
)
