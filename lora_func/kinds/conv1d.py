"""transformers' `Conv1D` (GPT-2, DistilGPT-2, GPT, and models built on them): a linear layer whose weight is
stored transposed.

    y = x W + b,   W stored (d_in, d_out)         read here as Wᵀ: (d_out, d_in), the linear layout

So everything is the linear kind's (LoRA's A (r, d_in), B (d_out, r), y + s · (x Aᵀ) Bᵀ), and every variant
computes on it exactly what it computes on an `nn.Linear` holding the transposed weight. Merged weights go
back transposed. Targeted by default. PEFT: `fan_in_fan_out=True` (peft/tuners/lora/layer.py, `Linear`).
"""

from __future__ import annotations

import torch
from torch import nn

from .._kind import BaseLayer, Target
from . import linear


def is_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D, recognised without importing transformers: `nf`, `nx`, weight (nx, nf)."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(getattr(module, "nx", None), int)
        and isinstance(weight, torch.Tensor)
        and tuple(weight.shape) == (module.nx, module.nf)
    )


def describe(path: str, module: nn.Module, roles) -> Target:
    return Target(path, module.nx, module.nf, roles(module.nx, module.nf), "conv1d", type(module).__name__)


def check(module: nn.Module, target: Target) -> str | None:
    if not is_conv1d(module):
        return f"is a {type(module).__name__}, not a transformers Conv1D"
    if (module.nx, module.nf) != (target.d_in, target.d_out):
        return f"is {module.nx} -> {module.nf} in the model, the adapter holds {target.d_in} -> {target.d_out}"
    return None


def weight(base: BaseLayer) -> torch.Tensor:
    """Wᵀ, (d_out, d_in), float32; for a float32 base a transposed view of the weight's own storage."""
    return base.module.weight.detach().to(torch.float32).t()


def forward(base: BaseLayer, x: torch.Tensor) -> torch.Tensor:
    module = base.module
    bias = linear.base_bias(module)
    w = module.weight.detach()
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ w if bias is None else torch.addmm(bias, x2, w)  # Conv1D's own computation
    return y.view(*x.shape[:-1], module.nf)


def state(base: BaseLayer, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    dtype = base.module.weight.dtype
    out = {"weight": weight.t().contiguous().to(dtype)}  # back to (d_in, d_out)
    if bias is not None:
        out["bias"] = bias.to(dtype)
    return out


KIND = linear.KIND._replace(
    name="conv1d",
    recognise=is_conv1d,
    describe=describe,
    check=check,
    weight=weight,
    forward=forward,
    state=state,
)
