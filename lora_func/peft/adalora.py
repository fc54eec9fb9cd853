"""AdaLoRA as PEFT's ADALORA: `lora_A` (r, d_in), `lora_E` (r, 1), `lora_B` (d_out, r) per target, on linear layers
(nn.Linear, bitsandbytes, transformers Conv1D) and nn.Conv2d (PEFT's `SVDConv2d`: `lora_A` (r, d_in · kh · kw), the
flattened kernel's columns, as lora_func holds it).

PEFT's `SVDConv2d` is right for groups 1 with zero padding, and wrong elsewhere, so those targets are refused both
ways: with groups > 1 its A has d_in · kh · kw columns, and B A cannot be reshaped to the grouped kernel (d_out,
d_in / groups, kh, kw) (its forward raises; `check_convolutions` below); with another padding mode (reflect, ...) its
forward convolves ΔW over a zero-padded input while the layer, and PEFT's own merge, pad as the layer does (refused by
the conv check all methods share). Stride, padding (ints or "same") and dilation it passes as the layer has them.

PEFT saves an adapter its allocator has worked on with the final `rank_pattern` in the config, `{"<module
path>.lora_E": [kept, ...]}` (init_r booleans per target), and only the kept ranks in the tensor file (its
`resize_state_dict_by_rank_pattern`). lora_func keeps every target at init_r ranks, the removed ones marked 0 in the
frozen `rank_mask` leaf: `from_peft` puts the removed ranks back as zeros at their positions, and `to_peft` writes
the kept ranks and the `rank_pattern` again (where some rank is removed), so a PEFT file round-trips as it was.
PEFT's divisor `ranknum` stays init_r after ranks are removed, and so does lora_func's.

`r` (LoraConfig's, which AdaLoRA ignores) is written as 8, PEFT's default, which PEFT reads without a warning;
`alpha_pattern`, `use_rslora` and `init_lora_weights` are ignored by PEFT's AdaLoRA and read as inert.
`total_step=None` (no allocator in lora_func) is written as the smallest value PEFT accepts, `tinit + tfinal + 1`:
a loaded adapter's allocator is not used at inference.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from .._config import AdapterConfig
from .._kind import Target
from .._params import Params
from ._fields import written
from ._method import PeftMethod
from .lora import INERT as LORA_INERT
from .lora import REQUIRED as LORA_REQUIRED
from .lora import dropout_in

KEYS = {"lora_A": "lora_A", "lora_E": "lora_E", "lora_B": "lora_B"}
INTS = {"init_r": 12, "target_r": 8, "tinit": 0, "tfinal": 0, "deltaT": 1}
FLOATS = {"beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5}


def fields_out(cfg: AdapterConfig, written_fields: Mapping[str, Any]) -> dict[str, Any]:
    total_step = cfg.total_step if cfg.total_step is not None else cfg.tinit + cfg.tfinal + 1
    return {
        "r": 8,
        **{name: getattr(cfg, name) for name in INTS},
        **{name: written(getattr(cfg, name)) for name in FLOATS},
        "total_step": total_step,
        "lora_dropout": written(cfg.dropout),
        "rank_pattern": None,  # replaced by `leaf_fields` where some rank is removed
    }


def _int(fields: Mapping[str, Any], name: str, where: str) -> int:
    value = fields.get(name, INTS.get(name))
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: `{name}` must be an int, got {json.dumps(value)}")
    return value


def _masks(fields: Mapping[str, Any], where: str) -> dict[str, list[bool]]:
    """PEFT's `rank_pattern`: {"<module path>.lora_E": [bool] * init_r}, checked; {} where absent."""
    pattern, init_r = fields.get("rank_pattern"), _int(fields, "init_r", where)
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise ValueError(f"{where}: `rank_pattern` must map `<module>.lora_E` to lists of booleans")
    out = {}
    for key, mask in pattern.items():
        if not key.endswith(".lora_E"):
            raise ValueError(f"{where}: `rank_pattern` key {key!r} does not name a `lora_E` (as PEFT saves them)")
        if not isinstance(mask, list) or len(mask) != init_r or not all(isinstance(b, bool) for b in mask):
            raise ValueError(f"{where}: `rank_pattern`[{key!r}] must be {init_r} booleans (`init_r`), got {mask!r}")
        out[key.removesuffix(".lora_E")] = mask
    return out


def fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {name: _int(fields, name, where) for name in INTS}
    for name, default in FLOATS.items():
        value = fields.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: `{name}` must be a number, got {json.dumps(value)}")
        out[name] = float(value)
    total_step = fields.get("total_step")
    if total_step is not None and (isinstance(total_step, bool) or not isinstance(total_step, int)):
        raise ValueError(f"{where}: `total_step` must be an int, got {json.dumps(total_step)}")
    out["total_step"] = total_step
    out["dropout"] = dropout_in(fields, where)
    _masks(fields, where)
    return out


def target_in(
    fields: Mapping[str, Any], target: Target, tensors: dict[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """The kept ranks PEFT stores, put back at their positions among init_r (the removed ones zero), and
    `rank_mask`."""
    init_r = _int(fields, "init_r", where)
    mask = _masks(fields, where).get(target.path)
    A, E, B = tensors["lora_A"], tensors["lora_E"], tensors["lora_B"]
    if mask is None:
        return {**tensors, "rank_mask": torch.ones(init_r, 1, dtype=E.dtype)}
    kept = torch.tensor(mask)
    count = int(kept.sum())
    stored = {"lora_A": A.shape[0], "lora_E": E.shape[0], "lora_B": B.shape[-1]}
    wrong = [leaf for leaf, ranks in stored.items() if ranks != count]
    if wrong:
        raise ValueError(
            f"{where}: {target.path}.{wrong[0]} holds {stored[wrong[0]]} ranks, and `rank_pattern` keeps {count} of "
            f"{init_r} for {target.path!r}"
        )
    full_A = A.new_zeros(init_r, *A.shape[1:])
    full_E = E.new_zeros(init_r, *E.shape[1:])
    full_B = B.new_zeros(*B.shape[:-1], init_r)
    full_A[kept], full_E[kept], full_B[:, kept] = A, E, B
    return {"lora_A": full_A, "lora_E": full_E, "lora_B": full_B, "rank_mask": kept.to(E.dtype).view(-1, 1)}


def rank_pattern(params: Params) -> dict[str, Any]:
    """PEFT's `rank_pattern` for params whose `rank_mask` removed some rank (every target listed, as PEFT saves it),
    else none."""
    masks = {t.path: params[t.path]["rank_mask"].detach().view(-1) != 0 for t in params.targets}
    if all(bool(m.all()) for m in masks.values()):
        return {"rank_pattern": None}
    return {"rank_pattern": {f"{path}.lora_E": m.tolist() for path, m in masks.items()}}


def kept_ranks(params: Params) -> Params:
    """The kept ranks only, as PEFT writes them (`resize_state_dict_by_rank_pattern`); no `rank_mask`."""
    entries = {}
    for path, entry in params.items():
        kept = entry["rank_mask"].detach().view(-1) != 0
        if bool(kept.all()):
            entries[path] = {leaf: entry[leaf] for leaf in KEYS}
        else:
            entries[path] = {
                "lora_A": entry["lora_A"][kept],
                "lora_E": entry["lora_E"][kept],
                "lora_B": entry["lora_B"][:, kept],
            }
    return Params(entries, params.config, params.targets)


def check_convolutions(targets, where: str) -> None:
    """PEFT's `SVDConv2d` computes lora_func's update only with groups 1 (see the module docstring)."""
    for t in targets:
        if t.kind == "conv" and t.get("groups") != 1:
            raise ValueError(
                f"{where}: {t.path!r} ({t.module}) has groups={t.get('groups')}; PEFT's AdaLoRA `SVDConv2d` holds an A "
                "of d_in · kh · kw columns, which does not reshape to a grouped kernel (its forward fails), so it "
                "has no PEFT counterpart"
            )


def exported(params: Params) -> Params:
    check_convolutions(params.targets, "to_peft")
    return kept_ranks(params)


METHOD = PeftMethod(
    variant="adalora",
    peft_type="ADALORA",
    keys=KEYS,
    rank_fields=None,
    alpha_fields=("lora_alpha", None),
    required={**LORA_REQUIRED, "loftq_config": {}},
    inert={
        **{k: v for k, v in LORA_INERT.items() if k != "loftq_config"},
        "r": 8,  # LoraConfig's, ignored by AdaLoRA (which warns where it is not 8)
        "alpha_pattern": {},  # ignored by PEFT's AdaLoRA (one lora_alpha for all targets)
        "use_rslora": False,  # ignored by PEFT's AdaLoRA (its scaling is lora_alpha)
        "init_lora_weights": True,  # init-time only
    },
    fields_out=fields_out,
    fields_in=fields_in,
    handled=(*INTS, *FLOATS, "total_step", "lora_dropout", "rank_pattern"),
    export_as=exported,
    leaf_fields=rank_pattern,
    target_in=target_in,
    kinds=("linear", "conv1d", "conv"),
    conv_dims=(2,),  # PEFT's AdaLoRA has nn.Conv2d only (`SVDConv2d`)
    conv_dilation=True,  # `SVDConv2d` convolves ΔW with the layer's dilation
    check_model=lambda model, targets, where: check_convolutions(targets, where),
)
