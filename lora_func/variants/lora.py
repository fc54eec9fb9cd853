"""LoRA: y' = y + s · (x Aᵀ) Bᵀ, with s = alpha / r (alpha / √r with rsLoRA).

Identity at init: B = 0 (A is kaiming-uniform, as in PEFT).
Hu et al. 2021, arXiv 2106.09685; rsLoRA: Kalajdzievski 2023, arXiv 2312.03732.
Reference: peft/tuners/lora/layer.py (`Linear.forward`, `get_delta_weight`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._config import AdapterConfig
from .._targets import Target
from .._variant import Init, Leaves, Site, Variant, require_rank


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """LoRA. `use_rslora=True` scales by alpha / √r instead of alpha / r."""

    use_rslora: bool = False


def scale(cfg: AdapterConfig) -> float:
    if getattr(cfg, "use_rslora", False):
        return cfg.alpha / math.sqrt(cfg.r)
    return cfg.alpha / cfg.r


def shapes(target: Target, cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
    require_rank(target, cfg)
    return {"A": (cfg.r, target.d_in), "B": (target.d_out, cfg.r)}


def create(target: Target, cfg: AdapterConfig, init: Init) -> Leaves:
    A = torch.empty(cfg.r, target.d_in)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=init.generator)
    return {"A": A, "B": torch.zeros(target.d_out, cfg.r)}


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


def _add_low_rank(x, A, B, s: float, y) -> torch.Tensor:
    A, B = A.to(x.dtype), B.to(x.dtype)
    if torch.compiler.is_compiling():  # dynamo cannot trace a Function with a custom jvp; inductor fuses anyway
        return _low_rank_forward(x, A, B, s, y)[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, A, B, y)):
        return LowRank.apply(x, A, B, s, y)[0]
    return _low_rank_forward(x, A, B, s, y)[0]  # nothing to differentiate: skip autograd.Function's overhead


def low_rank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """s · (x Aᵀ) Bᵀ, computed in x's dtype; the scale is applied on the (…, r) side where it is cheapest."""
    return _add_low_rank(x, A, B, s, None)


def add_low_rank(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """y + s · (x Aᵀ) Bᵀ, the add fused into the matmul (addmm) where y has x's dtype."""
    if y.dtype != x.dtype:
        return y + low_rank(x, A, B, s).to(y.dtype)
    return _add_low_rank(x, A, B, s, y)


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    return add_low_rank(y, x, leaves["A"], leaves["B"], scale(site.config))


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    B, A = leaves["B"].to(weight.dtype), leaves["A"].to(weight.dtype)
    return weight + scale(site.config) * (B @ A), bias


VARIANT = Variant(name="lora", config=LoRAConfig, shapes=shapes, create=create, forward=forward, merge=merge)
