"""Convolutions: `nn.Conv1d`, `nn.Conv2d`, `nn.Conv3d`, targeted when `target_names` names them.

    y = W ⋆ x + b,   W: (d_out, d_in / groups, *kernel)        read as (d_out, d_in / groups · ∏kernel)

LoRA as PEFT does it: A is a conv with the layer's kernel, stride and padding from all d_in channels to r,
B a 1×1 conv from r to d_out with the layer's groups (r must be a multiple of groups):

    y' = y + s · B ⋆ (A ⋆ x),    A: (r, d_in, *kernel),  B: (d_out, r / groups, 1, ...)

A also takes the layer's dilation and padding mode, so that B A is the layer's own kind of kernel and the
update merges: with groups = 1, ΔW = B A (as (d_out, r)·(r, d_in·∏kernel)). With groups > 1, A reads every
input channel while W's groups read their own, so ΔW is not a grouped kernel: the adapter runs, but does not
merge (PEFT refuses the same merge). PEFT's A has no dilation and pads with zeros: a layer with dilation or
another padding mode has no PEFT counterpart. Channels are dim 1 of a batch (dim 0 unbatched), so per-channel
gains (IA3) broadcast as (C, 1, ...).
Reference: peft/tuners/lora/layer.py (`_ConvNd`), peft/tuners/lora/dora.py (`_DoraConvNdLayer`),
peft/tuners/ia3/layer.py (`_ConvNd`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._kind import BaseLayer, Kind, Target
from . import linear

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, CONVS)


def _ints(value, field: str, dims: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"`{field}` must be a list of ints, got {value!r}")
    if dims is not None and len(value) != dims:
        raise ValueError(f"`{field}` must have {dims} entries, got {value!r}")
    return tuple(value)


def _padding(value) -> tuple[int, ...] | str:
    if value in ("same", "valid"):
        return value
    return _ints(value, "padding")


def _padding_mode(value) -> str:
    if value not in PADDING_MODES:
        raise ValueError(f"`padding_mode` must be one of {PADDING_MODES}, got {value!r}")
    return value


def _positive(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`groups` must be a positive int, got {value!r}")
    return value


LAYOUT_FIELDS = {
    "kernel_size": lambda v: _ints(v, "kernel_size"),
    "stride": lambda v: _ints(v, "stride"),
    "padding": _padding,
    "dilation": lambda v: _ints(v, "dilation"),
    "groups": _positive,
    "padding_mode": _padding_mode,
}


def layout_of(module: nn.Module) -> tuple[tuple[str, object], ...]:
    padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
    return (
        ("kernel_size", tuple(module.kernel_size)),
        ("stride", tuple(module.stride)),
        ("padding", padding),
        ("dilation", tuple(module.dilation)),
        ("groups", module.groups),
        ("padding_mode", module.padding_mode),
    )


def describe(path: str, module: nn.Module, roles) -> Target:
    d_in, d_out = module.in_channels, module.out_channels
    return Target(path, d_in, d_out, roles(d_in, d_out), "conv", type(module).__name__, layout_of(module))


def check(module: nn.Module, target: Target) -> str | None:
    if not is_conv(module):
        return f"is a {type(module).__name__}, not a convolution"
    if (module.in_channels, module.out_channels) != (target.d_in, target.d_out):
        return (
            f"is {module.in_channels} -> {module.out_channels} channels in the model, "
            f"the adapter holds {target.d_in} -> {target.d_out}"
        )
    if layout_of(module) != target.layout or len(module.kernel_size) != len(target.get("kernel_size")):
        return f"has layout {dict(layout_of(module))} in the model, the adapter holds {dict(target.layout)}"
    return None


def fan_in(target: Target) -> int:
    return target.d_in // target.get("groups") * math.prod(target.get("kernel_size"))


def weight(base: BaseLayer) -> torch.Tensor:
    return base.module.weight.detach().to(torch.float32).flatten(1)  # (d_out, d_in / groups · ∏kernel)


def bias(base: BaseLayer) -> torch.Tensor | None:
    b = base.module.bias
    return None if b is None else b.detach()


def forward(base: BaseLayer, x: torch.Tensor) -> torch.Tensor:
    return convolve(base, x, base.module.weight.detach(), bias(base))


def convolve(base: BaseLayer, x: torch.Tensor, kernel: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`kernel` ⋆ x (+ b) as the layer convolves: its stride, padding and padding mode, dilation, groups. A kernel
    in W's `(d_out, fan_in)` layout is reshaped to the layer's (weight-space variants: LoHa's, LoKr's ΔW)."""
    module = base.module
    return module._conv_forward(x, kernel.reshape(module.weight.shape), b)


def _explicit_padding(target: Target) -> list[int]:
    """F.pad's argument for a non-zeros padding mode: last spatial dim first, (left, right) each."""
    padding, kernel, dilation = target.get("padding"), target.get("kernel_size"), target.get("dilation")
    pads = []
    for i in reversed(range(len(kernel))):
        if padding == "valid":
            left = right = 0
        elif padding == "same":
            total = dilation[i] * (kernel[i] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = padding[i]
        pads += [left, right]
    return pads


def conv_a(target: Target, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """A ⋆ x with the layer's kernel, stride, padding, dilation and padding mode, groups = 1."""
    conv = _CONV_FN[len(target.get("kernel_size"))]
    stride, dilation, mode = target.get("stride"), target.get("dilation"), target.get("padding_mode")
    if mode != "zeros":
        return conv(F.pad(x, _explicit_padding(target), mode=mode), A, None, stride, 0, dilation)
    return conv(x, A, None, stride, target.get("padding"), dilation)


def low_rank_shapes(target: Target, cfg) -> dict[str, tuple[int, ...]]:
    groups, kernel = target.get("groups"), target.get("kernel_size")
    name = type(cfg).__name__
    if cfg.r % groups:
        raise ValueError(
            f"{name}: `r`={cfg.r} is not a multiple of groups={groups} of {target.path!r}: B is a grouped 1×1 conv "
            "(as in PEFT)"
        )
    limit = min(target.d_in * math.prod(kernel), target.d_out)
    if cfg.r > limit:
        raise ValueError(f"{name}: `r`={cfg.r} exceeds min(d_in·∏kernel, d_out)={limit} of {target.path!r}")
    ones = (1,) * len(kernel)
    return {"A": (cfg.r, target.d_in, *kernel), "B": (target.d_out, cfg.r // groups, *ones)}


def init_low_rank(target: Target, cfg, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """A kaiming-uniform as a conv weight (fan-in d_in·∏kernel, PEFT's default), B = 0."""
    return linear.kaiming_low_rank(low_rank_shapes(target, cfg), generator)


def low_rank(base: BaseLayer, x, A, B, s: float, y):
    conv = _CONV_FN[len(base.target.get("kernel_size"))]
    h = conv_a(base.target, x, A.to(x.dtype))  # (N, r, *out)
    out = conv(h, B.to(x.dtype), None, 1, 0, 1, base.target.get("groups")) * s  # (N, d_out, *out)
    return out if y is None else y + out.to(y.dtype)


def low_rank_delta(base: BaseLayer, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    target = base.target
    if target.get("groups") != 1:
        raise ValueError(
            f"{target.path!r} ({target.module}, groups={target.get('groups')}): LoRA's A reads every input channel "
            "while the layer's groups read their own, so B A is not a grouped kernel and does not merge into the "
            "layer (PEFT refuses this merge too)"
        )
    return B.flatten(1) @ A.flatten(1)  # (d_out, r)·(r, d_in·∏kernel)


def features(base: BaseLayer, v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *(1,) * len(base.target.get("kernel_size")))  # channels: (C, 1, ...)


def input_gain(base: BaseLayer, l: torch.Tensor) -> torch.Tensor:  # noqa: E741 (IA3's name)
    """W's column multiplier for input channel gains: output channel o reads its group's channels."""
    target = base.target
    groups, per_kernel = target.get("groups"), math.prod(target.get("kernel_size"))
    per_group = l.reshape(groups, -1)  # (groups, d_in / groups)
    rows = per_group[torch.arange(target.d_out, device=l.device) // (target.d_out // groups)]  # (d_out, d_in/groups)
    return rows.repeat_interleave(per_kernel, dim=1)  # (d_out, d_in / groups · ∏kernel)


def state(base: BaseLayer, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    module = base.module
    out = {"weight": weight.reshape(module.weight.shape).to(module.weight.dtype)}
    if bias is not None:
        out["bias"] = bias.to(module.weight.dtype)
    return out


KIND = Kind(
    name="conv",
    recognise=is_conv,
    describe=describe,
    check=check,
    weight=weight,
    bias=bias,
    forward=forward,
    state=state,
    low_rank_shapes=low_rank_shapes,
    init_low_rank=init_low_rank,
    low_rank=low_rank,
    low_rank_delta=low_rank_delta,
    features=features,
    input_gain=input_gain,
    layout_fields=LAYOUT_FIELDS,
)
