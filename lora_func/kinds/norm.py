"""Normalisation layers: `nn.LayerNorm`, `nn.RMSNorm`, `nn.GroupNorm`, and the norm classes of transformers and other
libraries (`LlamaRMSNorm`, `Qwen3RMSNorm`, `T5LayerNorm`, ...: a class whose name ends in `Norm`, with a 1-D `weight`
parameter, an optional 1-D `bias` of the same size, and no submodules). Targeted when `target_names` names them, or
by a variant that adapts no linear layer (LN Tuning).

    y = n(x) ⊙ g(w) + b        w, b: (d,), one value per feature (GroupNorm: per channel)

Each class computes n and g its own way (LayerNorm centres, RMSNorm does not, Gemma's RMSNorm scales by 1 + w,
HF's RMSNorms normalise in float32 and cast back before scaling), so the kind never restates that math: it runs
the layer's own `forward` with other tensors in place of `weight` and `bias` (`run`), on a shallow copy of the
module made for the call, so the model's module is never changed, not even for a moment, and no hook runs.
The weight is read as a `(d, 1)` matrix (`(d_out, fan_in)` with one column). Buffers (BatchNorm's running
statistics, which train mode changes in place) would be shared with the model: BatchNorm is not a target.
"""

from __future__ import annotations

import torch
from torch import nn

from .._kind import BaseLayer, Kind, Target


def _parameter(module: nn.Module, name: str) -> torch.Tensor | None:
    return module._parameters.get(name)


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer with a per-feature affine weight (see the module docstring)."""
    if isinstance(module, nn.modules.batchnorm._NormBase) or not type(module).__name__.endswith("Norm"):
        return False
    weight, bias = _parameter(module, "weight"), _parameter(module, "bias")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not weight.is_floating_point():
        return False
    if bias is not None and tuple(bias.shape) != tuple(weight.shape):
        return False
    others = set(module._parameters) - {"weight", "bias"}
    return not others and not any(True for _ in module.children())


def has_bias(module: nn.Module) -> bool:
    return _parameter(module, "bias") is not None


def describe(path: str, module: nn.Module, roles) -> Target:
    d = module.weight.shape[0]
    return Target(path, d, d, roles(d, d), "norm", type(module).__name__, (("bias", has_bias(module)),))


def check(module: nn.Module, target: Target) -> str | None:
    if not is_norm(module):
        return f"is a {type(module).__name__}, not a normalisation layer with a per-feature weight"
    if module.weight.shape[0] != target.d_out or has_bias(module) != target.get("bias"):
        return (
            f"has {module.weight.shape[0]} features{' and a bias' if has_bias(module) else ''} in the model, the "
            f"adapter holds {target.d_out}{' and a bias' if target.get('bias') else ''}"
        )
    return None


def run(module: nn.Module, x: torch.Tensor, parameters: dict[str, torch.Tensor]) -> torch.Tensor:
    """The layer's own forward on x with `parameters` ({"weight": ..., "bias": ...}) in place of its own, run on a
    shallow copy of the module: the model's module is not touched, and no hook of it runs."""
    view = object.__new__(type(module))
    view.__dict__.update(module.__dict__)
    view.__dict__["_parameters"] = {**module._parameters, **parameters}
    return type(module).forward(view, x)


def weight(base: BaseLayer) -> torch.Tensor:
    return base.module.weight.detach().to(torch.float32).reshape(-1, 1)  # (d, 1)


def bias(base: BaseLayer) -> torch.Tensor | None:
    b = _parameter(base.module, "bias")
    return None if b is None else b.detach()


def forward(base: BaseLayer, x: torch.Tensor) -> torch.Tensor:
    module = base.module
    return run(module, x, {k: v.detach() for k, v in module._parameters.items() if v is not None})


def state(base: BaseLayer, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    own = base.module.weight
    out = {"weight": weight.reshape(own.shape).to(own.dtype)}
    if bias is not None:
        out["bias"] = bias.to(base.module.bias.dtype)
    return out


def _bias_flag(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`bias` must be true or false, got {value!r}")
    return value


KIND = Kind(
    name="norm",
    recognise=is_norm,
    describe=describe,
    check=check,
    weight=weight,
    bias=bias,
    forward=forward,
    state=state,
    listed_only=True,
    layout_fields={"bias": _bias_flag},
)
