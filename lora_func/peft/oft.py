"""OFT as PEFT's OFT (v2): `oft_R.weight` (blocks, b(b−1)/2) stored as lora_func's `oft_R`, on nn.Linear and
nn.Conv2d targets.

PEFT sets exactly one of `r` (blocks) and `oft_block_size`; lora_func's `oft_block_size=0` means "blocks = r",
so the pair is written and read as it is. A block size (or count) that does not divide a layer's d_in is moved to
the nearest divisor per layer by both (PEFT warns), so the stored shapes agree. `coft` (a projection applied
in place during the forward) is not offered; `module_dropout` drops blocks in training only.

On nn.Conv2d, PEFT's merge computes lora_func's kernel W Rᵀ, but its unmerged forward unfolds the input into
kernel-sized patches (stride 1, no padding), rotates each and folds them back, summing where patches overlap: for a
kernel larger than 1×1 that is neither W Rᵀ nor the identity at init. Only 1×1 kernels (groups 1) are exchanged, where
the two agree; other convolutions are refused both ways.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .._config import AdapterConfig
from ._method import PeftMethod, flag


def _int(fields: Mapping[str, Any], name: str, default: int, where: str) -> int:
    value = fields.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: `{name}` must be a non-negative int, got {json.dumps(value)}")
    return value


# PEFT 0.18.0 changed the Cayley–Neumann series (to the one lora_func computes), and warns on loading older files.
NEUMANN_SINCE = (0, 18)


def _version(text: Any) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in str(text).partition("@")[0].split(".")[:2])
    except ValueError:
        return (0,)


def fields_out(cfg: AdapterConfig, written: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "peft_version": ".".join(map(str, NEUMANN_SINCE)) + ".0",  # the series lora_func computes is PEFT's since then
        "r": 0 if cfg.oft_block_size else cfg.r,
        "oft_block_size": cfg.oft_block_size,
        "block_share": cfg.block_share,
        "use_cayley_neumann": cfg.use_cayley_neumann,
        "num_cayley_neumann_terms": cfg.num_cayley_neumann_terms,
    }


def fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    if "oft_block_size" not in fields:
        raise ValueError(
            f"{where}: no `oft_block_size`: an OFT adapter of PEFT < 0.14, whose parameterization lora_func lacks"
        )
    r, size = _int(fields, "r", 0, where), _int(fields, "oft_block_size", 32, where)
    if (r == 0) == (size == 0):
        raise ValueError(
            f"{where}: exactly one of `r` ({r}) and `oft_block_size` ({size}) must be non-zero, as PEFT requires"
        )
    out = {
        "oft_block_size": size,
        "block_share": flag(fields, "block_share", where),
        "use_cayley_neumann": fields.get("use_cayley_neumann", True) is not False
        and flag(fields, "use_cayley_neumann", where),
        "num_cayley_neumann_terms": _int(fields, "num_cayley_neumann_terms", 5, where),
    }
    if out["use_cayley_neumann"] and _version(fields.get("peft_version", "0.0.0")) < NEUMANN_SINCE:
        raise ValueError(
            f"{where}: `use_cayley_neumann` with `peft_version`={json.dumps(fields.get('peft_version'))}: PEFT before "
            "0.18.0 used another Cayley–Neumann series, which lora_func does not compute"
        )
    if r:
        out["r"] = r
    return out


def check_convolutions(targets, where: str) -> None:
    """PEFT's OFT Conv2d computes lora_func's rotated kernel unmerged only on 1×1 kernels, groups 1."""
    for t in targets:
        if t.kind != "conv":
            continue
        kernel, groups = t.get("kernel_size"), t.get("groups")
        if groups != 1 or set(kernel) != {1}:
            raise ValueError(
                f"{where}: {t.path!r} ({t.module}) has kernel_size={kernel}, groups={groups}; PEFT's OFT Conv2d "
                "rotates unfolded input patches and folds them back (summing their overlaps), which is lora_func's "
                "rotated kernel only for 1×1 kernels with groups 1, so it would not compute what lora_func does"
            )


def checked(params):
    check_convolutions(params.targets, "to_peft")
    return params


METHOD = PeftMethod(
    variant="oft",
    peft_type="OFT",
    keys={"oft_R": "oft_R.weight"},
    rank_fields=None,
    alpha_fields=None,
    required={"coft": False, "fan_in_fan_out": False},
    inert={
        "module_dropout": 0.0,  # training only
        "eps": 6e-5,  # read only with coft
        "init_weights": True,  # init-time only
    },
    fields_out=fields_out,
    fields_in=fields_in,
    handled=("r", "oft_block_size", "block_share", "use_cayley_neumann", "num_cayley_neumann_terms"),
    kinds=("linear", "conv"),
    conv_dims=(2,),
    export_as=checked,
    check_model=lambda model, targets, where: check_convolutions(targets, where),
)
