"""Linear layers: `nn.Linear`, bitsandbytes `Linear4bit` / `Linear8bitLt`, and any module with `in_features`,
`out_features` and a `weight` (so quantized layers need no class of their own).

    y = x Wᵀ + b,   W: (d_out, d_in)        LoRA: y + s · (x Aᵀ) Bᵀ,  A: (r, d_in),  B: (d_out, r)

Targeted by default. The weight is read dequantized (float32) for bitsandbytes layers; their forward runs
through `QuantizedLinear` under torch.func. Reference: peft/tuners/lora/layer.py (`Linear`).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import _torch_private as private
from .._kind import BaseLayer, Kind, Target
from .._sharded import full, is_sharded
from .._variant import require_rank


def is_linear_like(module: nn.Module) -> bool:
    """A module with `in_features`, `out_features` and a `weight` (nn.Linear, bnb Linear4bit/8bitLt, ...)."""
    return (
        isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
        and getattr(module, "weight", None) is not None
    )


def quantization(module: nn.Module) -> str | None:
    """ "4bit", "8bit" or None for a float weight."""
    weight = module.weight
    if getattr(weight, "quant_state", None) is not None or type(weight).__name__ == "Params4bit":
        return "4bit"
    if getattr(module, "quant_state", None) is not None:  # bnb's Linear4bit sharded by FSDP2: the state is the layer's
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

            state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
            if state is None:
                raise ValueError(f"{type(module).__name__} weight is not quantized yet (no `quant_state`)")
            packed = full(weight.detach()) if is_sharded(weight) else weight.data  # FSDP2: gathered, this layer only
            dense = bnbf.dequantize_4bit(packed, state)
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


# ---- LoRA's product on features-last layers: shared with transformers' Conv1D -----------------------------------


_recording = threading.local()  # .record: this thread's book-keeping recorder (`recording`), or absent


@contextlib.contextmanager
def recording(record: Callable[..., None]) -> Iterator[None]:
    """Inside the block, in this thread, each `LowRank` product built with grad hands its backward's pieces to
    `record(A, B, x, h, gh, g)` instead of computing dA and dB (it returns no gradient for A and B; dx and dy as
    usual): x (n, d_in), h = s x Aᵀ (n, r), gh = s B ᵀ gᵀ (r, n), g (n, d_out), n the tokens of the call. A product
    computed without grad calls `record.without_grad(A)`: its backward, if any, runs elsewhere.
    DP-SGD's book-keeping (`lora_func/_private.py`) builds per-example norms and clipped sums from them.
    The recorder is bound when the forward runs, so a backward outside the block still records."""
    previous = getattr(_recording, "record", None)
    _recording.record = record
    try:
        yield
    finally:
        _recording.record = previous


def _low_rank_forward(x, A, B, s: float, y) -> tuple[torch.Tensor, torch.Tensor]:
    """(y + s · (x Aᵀ) Bᵀ, h = s · x Aᵀ as (n, r)); y may be None."""
    x2 = x.reshape(-1, x.shape[-1])  # (n, d_in)
    h = (A @ x2.t()).t() * s  # (n, r), as A xᵀ: (r, d_in)·(d_in, n)
    out = h @ B.t() if y is None else torch.addmm(y.reshape(-1, y.shape[-1]), h, B.t())  # (n, d_out)
    return out.view(*x.shape[:-1], B.shape[0]), h


class LowRank(torch.autograd.Function):
    """y + s · (x Aᵀ) Bᵀ (y optional), with a hand-written backward in the layouts BLAS is fast at.

    Autograd's backward of `F.linear(h, B)` forms g B and gᵀ h as (n × d_out)·(d_out × r) and
    (d_out × n)·(n × r) products, a layout in which MKL's CPU GEMM is about 4× slower for r ≪ d than
    the same products transposed, (r × d_out)·(d_out × n) and (r × n)·(n × d_out). Here the r-side
    is computed as r × n throughout, and y is added inside the second GEMM (addmm).
    Saved: x, A, B and the small h = s x Aᵀ (n × r). When backward itself is differentiated
    (create_graph, torch.func), h is recomputed from x and A so second derivatives stay exact.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, A, B, s: float, y):
        return _low_rank_forward(x, A, B, s, y)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, A, B, s, y = inputs
        ctx.save_for_backward(x, A, B, output[1])
        ctx.save_for_forward(x, A, B)
        ctx.s, ctx.has_y = s, y is not None
        ctx.record = getattr(_recording, "record", None)
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g, _):
        x, A, B, h = ctx.saved_tensors
        if g is None:
            return None, None, None, None, None
        s = ctx.s
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])  # (n, d_in), (n, d_out)
        if torch.is_grad_enabled():
            h = (A @ x2.t()).t() * s  # differentiable, for double backward
        gh = (B.t() @ g2.t()) * s  # (r, n): ∂/∂h, transposed
        dx = (gh.t() @ A).view(x.shape) if ctx.needs_input_grad[0] else None  # (..., d_in)
        if ctx.record is not None:
            ctx.record(A, B, x2, h, gh, g2)
            return dx, None, None, None, (g if ctx.has_y else None)
        dA = gh @ x2 if ctx.needs_input_grad[1] else None  # (r, d_in)
        dB = (h.t() @ g2).t() if ctx.needs_input_grad[2] else None  # (d_out, r)
        return dx, dA, dB, None, (g if ctx.has_y else None)

    @staticmethod
    def jvp(ctx, dx, dA, dB, _, dy):
        # Forward mode (torch.func.jvp, jacfwd): the product rule.
        x, A, B = ctx.saved_tensors
        h = F.linear(x, A)  # (..., r)
        dh = F.linear(x, torch.zeros_like(A) if dA is None else dA)
        if dx is not None:
            dh = dh + F.linear(dx, A)
        out = F.linear(dh, B)
        if dB is not None:
            out = out + F.linear(h, dB)
        out = out * ctx.s
        return (out if dy is None else out + dy), None


def _add_low_rank(x, A, B, s: float, y, inference: bool = False) -> torch.Tensor:
    """y + s · (x Aᵀ) Bᵀ, in one of two op sequences, chosen by what is computed, never by the grad mode alone:
    under reentrant gradient checkpointing a training-mode forward runs without grad, and its recompute with
    grad must match it bitwise.
    - The fewest ops, ordered as PEFT orders them, y + (x Aᵀ Bᵀ) s, differentiated by autograd: for few rows
      (`_LAYOUT_ROWS`: a launch-bound step, decoding), off the CPU, and for an eval-mode layer with grad off
      (`inference`). There the launches and Python frames are the adapter's whole cost per target and call.
    - Many rows on a CPU, book-keeping per-example norms (`recording`), or saved-tensor hooks (non-reentrant
      checkpointing, offloading): `LowRank` (its backward's layouts, the recorder's hook, four saved tensors)
      when something requires grad, else its forward. Under non-reentrant checkpointing the choice is the same
      in the forward and the recompute (both run under saved-tensor hooks). (It was taken there because a failed
      recompute seemed to keep the graph alive through autograd's own ops; the holder was the autograd engine's
      queue, which `_inject/checkpoint.py` now empties, for either op sequence.)"""
    recorder = getattr(_recording, "record", None)
    if recorder is not None and not torch.is_grad_enabled():
        recorder.without_grad(A)  # a forward that records nothing for backward (reentrant checkpointing's first pass)
    if A.dtype != x.dtype:
        A, B = A.to(x.dtype), B.to(x.dtype)
    compiling = torch.compiler.is_compiling()
    few = (
        recorder is None
        and not compiling
        and (not x.is_cpu or x.numel() < _LAYOUT_ROWS * x.shape[-1])
        and private.saved_tensors_hooks() is None
    )
    if few or (inference and not torch.is_grad_enabled()):
        z = F.linear(F.linear(x, A), B)  # under autocast, autocast's own casts
        return z * s if y is None else torch.add(y, z, alpha=s)
    if compiling:  # dynamo cannot trace a Function with a custom jvp; inductor fuses anyway
        return _low_rank_forward(x, A, B, s, y)[0]
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad or _requires_grad(y)):
        dtype = autocast_dtype(x)
        if dtype is not None:
            # Under autocast the forward's matmuls would run in `dtype` while A and B stay float32, and the hand-written
            # backward would multiply them by a `dtype` gradient. Cast first (autocast's own casts, differentiable)
            # and run the Function outside autocast: every tensor its backward sees has one dtype.
            with torch.autocast(x.device.type, enabled=False):
                y = None if y is None else y.to(dtype)
                return LowRank.apply(x.to(dtype), A.to(dtype), B.to(dtype), s, y)[0]
        return LowRank.apply(x, A, B, s, y)[0]
    return _low_rank_forward(x, A, B, s, y)[0]  # nothing to differentiate: skip autograd.Function's overhead


# From this many rows on, on a CPU, `LowRank`'s backward layouts pay for its Python overhead (a Python backward
# and autograd.Function's argument binding on every call). Measured, 1 thread, r 8, forward and backward of one
# target: 16 rows and d 128..384 take 0.24-0.32 ms in the fewest ops against 0.49-0.71 ms through `LowRank`.
_LAYOUT_ROWS = 256


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype `torch.autocast` runs x's matmuls in, or None where autocast is off for x's device (or leaves x as
    it is: autocast never casts float64). Called on every differentiated low-rank product, so the common devices
    skip building a `torch.device`."""
    if x.is_cpu:
        device = "cpu"
    elif x.is_cuda:
        device = "cuda"
    else:
        device = x.device.type
        available = _AUTOCAST_DEVICES.get(device)
        if available is None:
            available = _AUTOCAST_DEVICES[device] = torch.amp.is_autocast_available(device)
        if not available:
            return None
    if not torch.is_autocast_enabled(device) or x.dtype == torch.float64 or not x.is_floating_point():
        return None
    return torch.get_autocast_dtype(device)


_AUTOCAST_DEVICES: dict[str, bool] = {}  # device type -> whether torch.autocast exists for it


def _requires_grad(y: torch.Tensor | None) -> bool:
    return y is not None and y.requires_grad


def low_rank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, inference: bool = False) -> torch.Tensor:
    """s · (x Aᵀ) Bᵀ, computed in x's dtype; the scale is applied on the (…, r) side where it is cheapest."""
    return _add_low_rank(x, A, B, s, None, inference)


def add_low_rank(
    y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, inference: bool = False
) -> torch.Tensor:
    """y + s · (x Aᵀ) Bᵀ, the add fused into the matmul (addmm) where y has x's dtype."""
    if y.dtype != x.dtype:
        return y + low_rank(x, A, B, s, inference).to(y.dtype)
    return _add_low_rank(x, A, B, s, y, inference)


# ---- the kind's functions: features-last layers (also used by conv1d.py) ----------------------------------------


def factored_forms(factors: Callable) -> tuple[Callable, Callable]:
    """`forward` and `merge` of a variant whose ΔW is the product B A of `factors(leaves, site) -> (B, A)` (RandLoRA,
    VBLoRA): y + x Aᵀ Bᵀ (the add fused into the second product), and W + B A."""

    def forward(x: torch.Tensor, y: torch.Tensor, leaves, site) -> torch.Tensor:
        B, A = factors(leaves, site)
        return add_low_rank(y, x, A, B, 1.0)

    def merge(weight: torch.Tensor, bias, leaves, site):
        B, A = factors(leaves, site)
        return weight + (B @ A).to(weight.dtype), bias

    return forward, merge


def low_rank_shapes(target: Target, cfg) -> dict[str, tuple[int, ...]]:
    require_rank(target, cfg)
    return {"A": (cfg.r, target.d_in), "B": (target.d_out, cfg.r)}


def kaiming_low_rank(shapes: dict[str, tuple[int, ...]], generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """A kaiming-uniform as a layer weight of its shape (fan-in: all but dim 0; PEFT's default), B = 0."""
    A = torch.empty(shapes["A"])
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    return {"A": A, "B": torch.zeros(shapes["B"])}


def init_low_rank(target: Target, cfg, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """A kaiming-uniform (as nn.Linear's weight, PEFT's default), B = 0."""
    return kaiming_low_rank(low_rank_shapes(target, cfg), generator)


def features_last_low_rank(base: BaseLayer, x, A, B, s: float, y):
    inference = not base.module.training
    return low_rank(x, A, B, s, inference) if y is None else add_low_rank(y, x, A, B, s, inference)


def matrix_delta(base: BaseLayer, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return B @ A


def features_last(base: BaseLayer, v: torch.Tensor) -> torch.Tensor:
    return v


def column_gain(base: BaseLayer, l: torch.Tensor) -> torch.Tensor:  # noqa: E741 (IA3's name)
    return l[None, :]


def project(base: BaseLayer, rows: torch.Tensor) -> torch.Tensor:
    """rows Wᵀ through the layer's own kernel (a bnb layer is not dequantized), minus its bias."""
    out = base(rows)
    bias = base.bias
    return out if bias is None else out - bias.to(out.dtype)


# ---- linear ------------------------------------------------------------------------------------------------------


def describe(path: str, module: nn.Module, roles) -> Target:
    d_in, d_out = module.in_features, module.out_features
    return Target(path, d_in, d_out, roles(d_in, d_out), "linear", type(module).__name__)


def check(module: nn.Module, target: Target) -> str | None:
    if not is_linear_like(module):
        return f"is a {type(module).__name__}, not a linear layer"
    if (module.in_features, module.out_features) != (target.d_in, target.d_out):
        shape, held = f"{module.in_features} -> {module.out_features}", f"{target.d_in} -> {target.d_out}"
        return f"is {shape} in the model, the adapter holds {held}"
    return None


def weight(base: BaseLayer) -> torch.Tensor:
    return dense_weight(base.module)


def bias(base: BaseLayer) -> torch.Tensor | None:
    return base_bias(base.module)


def forward(base: BaseLayer, x: torch.Tensor) -> torch.Tensor:
    module = base.module
    if quantization(module) is not None:
        return QuantizedLinear.apply(x, module)
    if type(module).forward is nn.Linear.forward:
        return F.linear(x, module.weight.detach(), base_bias(module))
    return type(module).forward(module, x)  # another linear-like module: its own forward, hooks bypassed


def state(base: BaseLayer, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A merged weight as the module's own: float32 for a bnb layer (it cannot hold a float weight), else its dtype."""
    module = base.module
    dtype = torch.float32 if quantization(module) else module.weight.dtype
    out = {"weight": weight.to(dtype)}
    if bias is not None:
        out["bias"] = bias.to(dtype)
    return out


KIND = Kind(
    name="linear",
    recognise=is_linear_like,
    describe=describe,
    check=check,
    weight=weight,
    bias=bias,
    forward=forward,
    project=project,
    state=state,
    low_rank_shapes=low_rank_shapes,
    init_low_rank=init_low_rank,
    low_rank=features_last_low_rank,
    low_rank_delta=matrix_delta,
    features=features_last,
    input_gain=column_gain,
    by_default=True,
)
