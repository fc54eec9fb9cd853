"""IA3 as PEFT's IA3 with `feedforward_modules` holding none of the targets: `ia3_l` (d_out, 1) scales the output.

PEFT's IA3 is two lora_func variants: a target in `feedforward_modules` scales its input (IA3-FF, `ia3ff.py`),
any other its output (IA3). One lora_func Params holds one variant, so a PEFT config whose `feedforward_modules`
covers some of its targets but not all is refused, naming the two adapters it amounts to.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .._config import AdapterConfig
from ._method import PeftMethod, describe, refuse

KEYS = {"l": "ia3_l"}
REQUIRED = {"fan_in_fan_out": False}
INERT = {"init_ia3_weights": True}  # init-time only
ABSENT = ("layers_to_transform", "layers_pattern", "bias")


def feedforward(fields: Mapping[str, Any], paths: list[str], where: str) -> list[str]:
    """The targets PEFT's IA3 treats as feed-forward (`IA3Model._check_target_module_feedforward`)."""
    ff = fields.get("feedforward_modules")
    if ff is None:
        refuse(
            where,
            "feedforward_modules",
            ff,
            "PEFT fills it from its own per-architecture table, which lora_func does not hold; name the modules "
            "([] for none)",
        )
    if not isinstance(ff, (str, list)) or (isinstance(ff, list) and not all(isinstance(f, str) for f in ff)):
        raise ValueError(f"{where}: `feedforward_modules` must be a regex string or a list of names")
    if isinstance(ff, str):
        try:
            re.compile(ff)
        except re.error as e:
            raise ValueError(f"{where}: `feedforward_modules`={json.dumps(ff)} is not a regex: {e}") from None
    targets = fields.get("target_modules")
    if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
        raise ValueError(f"{where}: `feedforward_modules` must be a subset of `target_modules` (PEFT refuses it too)")
    if isinstance(ff, str):
        return [p for p in paths if re.fullmatch(ff, p)]
    return [p for p in paths if any(p.endswith(f) for f in ff)]  # PEFT's test: no dot boundary


def claims(on_input: bool) -> Callable[[Mapping[str, Any], list[str], str], bool]:
    def claim(fields: Mapping[str, Any], paths: list[str], where: str) -> bool:
        ff = feedforward(fields, paths, where)
        if 0 < len(ff) < len(paths):
            plain = [p for p in paths if p not in ff]
            raise ValueError(
                f"{where}: `feedforward_modules`={json.dumps(fields['feedforward_modules'])} covers {len(ff)} of the "
                f"{len(paths)} modules `target_modules` selects, and one lora_func Params holds one variant: this "
                f"adapter is two in lora_func, lf.IA3Config on {describe(plain)} and lf.IA3FFConfig on "
                f"{describe(ff)}"
            )
        return bool(ff) == on_input

    return claim


def fields_out(on_input: bool) -> Callable[[AdapterConfig, Mapping[str, Any]], dict[str, Any]]:
    # An empty list, not null: PEFT fills a null `feedforward_modules` from its per-architecture table.
    return lambda cfg, written: {"feedforward_modules": written["target_modules"] if on_input else []}


def layout(on_input: bool):
    """IA3's (d,) gain as PEFT's `ia3_l`: (1, d_in) on a feed-forward target, else (d_out, 1)."""

    def out(leaf: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(1, -1) if on_input else tensor.reshape(-1, 1)

    def into(leaf: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        stored = (1, shape[0]) if on_input else (shape[0], 1)
        return tensor.reshape(shape) if tuple(tensor.shape) == stored else tensor

    return out, into


def method(variant: str, *, on_input: bool) -> PeftMethod:
    """PEFT's IA3 as lora_func's IA3 (no feed-forward targets) or IA3-FF (all targets feed-forward)."""
    tensor_out, tensor_in = layout(on_input)
    return PeftMethod(
        variant=variant,
        peft_type="IA3",
        keys=KEYS,
        rank_fields=None,
        alpha_fields=None,
        required=REQUIRED,
        inert=INERT,
        absent=ABSENT,
        fields_out=fields_out(on_input),
        handled=("feedforward_modules",),
        claims=claims(on_input),
        tensor_out=tensor_out,
        tensor_in=tensor_in,
        kinds=("linear", "conv1d", "conv"),
        conv_dims=(2, 3),  # PEFT's IA3 has no nn.Conv1d layer
    )


METHOD = method("ia3", on_input=False)
