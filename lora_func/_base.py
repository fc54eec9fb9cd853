"""Read-only access to a base layer's weight, whatever it is stored as (float, bnb 4-bit, bnb 8-bit)."""

from __future__ import annotations

import torch
from torch import nn


def quantization(module: nn.Module) -> str | None:
    """ "4bit", "8bit" or None for a float weight."""
    weight = module.weight
    if getattr(weight, "quant_state", None) is not None or type(weight).__name__ == "Params4bit":
        return "4bit"
    if weight.dtype == torch.int8:
        return "8bit"
    return None


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The base weight as a float32 `(d_out, d_in)` tensor, dequantized for bitsandbytes layers. Read-only:
    for a float32 base it is the weight's own storage."""
    weight = module.weight
    kind = quantization(module)
    with torch.no_grad():
        if kind == "4bit":
            import bitsandbytes.functional as bnbf

            if weight.quant_state is None:
                raise ValueError(f"{type(module).__name__} weight is not quantized yet (no `quant_state`)")
            dense = bnbf.dequantize_4bit(weight.data, weight.quant_state)
        elif kind == "8bit":
            scale = getattr(weight, "SCB", None)
            if scale is None:
                scale = getattr(getattr(module, "state", None), "SCB", None)
            if scale is None:
                raise ValueError(f"{type(module).__name__} int8 weight has no `SCB` scale")
            dense = weight.data.float() * (scale.float().unsqueeze(1) / 127.0)
        else:
            dense = weight.detach()
        return dense.to(torch.float32).reshape(module.out_features, module.in_features)


def base_bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()


class QuantizedLinear(torch.autograd.Function):
    """A bnb layer's own forward, with an input-gradient backward that torch.func can transform.

    bnb's autograd.Functions use the old `forward(ctx, ...)` style, which torch.func rejects, and
    its kernels have no vmap rule. Here the forward runs bnb's inference path (grad is off inside),
    the backward multiplies by the dequantized weight (what bnb's own backward does), and under
    vmap the vmapped axis is folded into the batch so the base matmul runs once.
    """

    @staticmethod
    def forward(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        return type(module).forward(module, x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.module = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ dense_weight(ctx.module).to(grad.dtype), None

    @staticmethod
    def vmap(info, in_dims, x: torch.Tensor, module: nn.Module):
        if in_dims[0] is None:
            return QuantizedLinear.apply(x, module), None
        x = x.movedim(in_dims[0], 0)
        y = QuantizedLinear.apply(x.reshape(-1, x.shape[-1]), module)
        return y.reshape(*x.shape[:-1], y.shape[-1]), 0
