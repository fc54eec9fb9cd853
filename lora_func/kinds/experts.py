"""Fused MoE experts: a 3-D parameter holding one weight per expert, selected by `target_parameters`
(transformers 5 `Qwen3MoeExperts.gate_up_proj (E, 2·d_ff, d)` and `down_proj (E, d, d_ff)`, and the like).

    W: (E, d_out, d_in)  (or (E, d_in, d_out) where the module says `is_transposed`, as PEFT reads it)
    LoRA per expert: W'_e = W_e + s · B_e A_e,   A: (E, r, d_in),  B: (E, d_out, r)

The expert loop is the model's own code, so the update is not added to an output: for the duration of the
module's forward the parameter is replaced by W + s · B A (the parameter form), as PEFT's `ParamWrapper`
does. The target's path is the parameter's name ("model.layers.0.mlp.experts.gate_up_proj"). No adapter
dropout here: there is no adapter input to drop (PEFT refuses `lora_dropout` too).
PEFT stores the same factors as `lora_A (E·r, d_in)` (expert-major rows) and `lora_B (d_out, r·E)`
(expert-minor columns). Reference: peft/tuners/lora/layer.py (`ParamWrapper`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._kind import BaseLayer, Kind, Target
from . import linear


def _flag(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`transposed` must be true or false, got {value!r}")
    return value


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`experts` must be a positive int, got {value!r}")
    return value


LAYOUT_FIELDS = {"experts": _count, "transposed": _flag}


def module_path(target: Target) -> str:
    return target.path.rpartition(".")[0]


def parameter_name(target: Target) -> str:
    return target.path.rpartition(".")[2]


def describe(path: str, module: nn.Module, roles) -> Target:
    name = path.rpartition(".")[2]
    param = getattr(module, name)
    if param.dim() != 3:
        raise ValueError(
            f"`target_parameters` selects {path!r} of shape {tuple(param.shape)}: lora_func adapts 3-D expert "
            "parameters (experts, d_out, d_in); adapt a 2-D weight through its module (`target_names`)"
        )
    transposed = bool(getattr(module, "is_transposed", False))
    experts, d_out, d_in = param.shape
    if transposed:
        d_in, d_out = d_out, d_in
    layout = (("experts", experts), ("transposed", transposed))
    return Target(path, d_in, d_out, roles(d_in, d_out), "experts", type(module).__name__, layout)


def check(module: nn.Module, target: Target) -> str | None:
    param = getattr(module, parameter_name(target), None)
    if not isinstance(param, torch.Tensor):
        return f"is not a parameter of {type(module).__name__}"
    experts, d_out, d_in = target.get("experts"), target.d_out, target.d_in
    want = (experts, d_in, d_out) if target.get("transposed") else (experts, d_out, d_in)
    if tuple(param.shape) != want:
        return f"has shape {tuple(param.shape)} in the model, the adapter holds {want}"
    return None


def _param(base: BaseLayer) -> torch.Tensor:
    return getattr(base.module, parameter_name(base.target))


def weight(base: BaseLayer) -> torch.Tensor:
    w = _param(base).detach().to(torch.float32)
    return w.transpose(1, 2) if base.target.get("transposed") else w  # (E, d_out, d_in)


def state(base: BaseLayer, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    param = _param(base)
    if base.target.get("transposed"):
        weight = weight.transpose(1, 2)
    return {parameter_name(base.target): weight.to(param.dtype)}


def low_rank_shapes(target: Target, cfg) -> dict[str, tuple[int, ...]]:
    dropout = getattr(cfg, "dropout", 0.0)
    if dropout:
        raise ValueError(
            f"{type(cfg).__name__}: `dropout`={dropout} cannot apply to {target.path!r} (fused experts): the update "
            "is folded into the expert weights, so there is no adapter input to drop (PEFT refuses it too)"
        )
    linear.require_rank(target, cfg)
    experts = target.get("experts")
    return {"A": (experts, cfg.r, target.d_in), "B": (experts, target.d_out, cfg.r)}


def init_low_rank(target: Target, cfg, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """PEFT's draw: A kaiming-uniform as one (E·r, d_in) linear weight (fan-in d_in), B = 0."""
    shapes = low_rank_shapes(target, cfg)
    A = torch.empty(math.prod(shapes["A"][:2]), target.d_in)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    return {"A": A.reshape(shapes["A"]), "B": torch.zeros(shapes["B"])}


KIND = Kind(
    name="experts",
    recognise=None,
    describe=describe,
    check=check,
    weight=weight,
    bias=lambda base: None,
    state=state,
    low_rank_shapes=low_rank_shapes,
    init_low_rank=init_low_rank,
    low_rank_delta=lambda base, A, B: B @ A,  # (E, d_out, r)·(E, r, d_in)
    parameter_form=True,
    layout_fields=LAYOUT_FIELDS,
    module_path=module_path,
)
