"""DoRA: a learned magnitude per output row times the row-normalised LoRA-updated weight.

    W' = diag(m / n) (W + s B A),     n_i = ‖W_i + s (B A)_i‖  (detached, as in PEFT)
    y' = (m / n) ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ) + b          (the bias is not rescaled, as in PEFT)

n is never built from a d_out × d_in product. With W Aᵀ from the base layer run on A's r rows:

    n_i² = ‖W_i‖² + 2 s Σ_k B_ik (W Aᵀ)_ik + s² B_i (A Aᵀ) B_iᵀ

where ‖W_i‖² is a frozen leaf computed once at init from the dequantized weight, so the same code
runs on bitsandbytes bases. `r`, `alpha`, `use_rslora` mean what they mean for LoRA.
Identity at init: B = 0 and m = √‖W_i‖², so m / n is exactly 1.
Liu et al. 2024, arXiv 2402.09353. Reference: peft/tuners/lora/dora.py (`DoraLinearLayer.forward`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._base import base_bias
from .._config import AdapterConfig
from .._variant import Init, Leaves, Site, Variant
from . import lora


@dataclass(frozen=True)
class DoRAConfig(AdapterConfig):
    """DoRA (PEFT's `LoraConfig(use_dora=True)`). `r`, `alpha` as for LoRA: the update is s·B A with
    s = alpha / r (alpha / √r with `use_rslora=True`)."""

    use_rslora: bool = False


def shapes(target, cfg) -> dict[str, tuple[int, ...]]:
    return {**lora.shapes(target, cfg), "magnitude": (target.d_out,), "weight_sq_norm": (target.d_out,)}


def squared_row_norms(weight: torch.Tensor) -> torch.Tensor:
    """‖W_i‖² of the dense (dequantized) weight, (d_out,): the frozen `weight_sq_norm` leaf."""
    return weight.square().sum(dim=1)


def create(target, cfg: DoRAConfig, init: Init) -> Leaves:
    weight_sq_norm = squared_row_norms(init.weight()).to(cfg.dtype)  # (d_out,)
    # m from the stored ‖W_i‖² by the same ops as `forward`'s n, so that m / n is exactly 1 at init.
    magnitude = weight_sq_norm.to(torch.promote_types(cfg.dtype, torch.float32)).sqrt().to(cfg.dtype)
    return {**lora.create(target, cfg, init), "magnitude": magnitude, "weight_sq_norm": weight_sq_norm}


def row_norm(leaves: Leaves, site: Site, dtype: torch.dtype) -> torch.Tensor:
    """n_i = ‖W_i + s (B A)_i‖ without a d_out × d_in product, detached; (d_out,), at least float32."""
    s = lora.scale(site.config)
    acc = torch.promote_types(leaves["A"].dtype, torch.float32)
    A, B = leaves["A"].detach(), leaves["B"].detach().to(acc)
    with torch.no_grad():
        # The base layer's own forward (hooks bypassed) on A's rows: A Wᵀ + b, whatever W is stored as.
        WA = site.module.forward(A.to(dtype)).to(acc)  # (r, d_out)
        bias = base_bias(site.module)
        if bias is not None:
            WA = WA - bias.to(acc)
        A = A.to(acc)
        M = torch.addmm(WA.t(), B, A @ A.t(), beta=2 * s, alpha=s * s)  # 2s W Aᵀ + s² B (A Aᵀ), (d_out, r)
        # Σ_k B_ik M_ik = 2s W_i · (B A)_i + s² ‖(B A)_i‖²
        sq = leaves["weight_sq_norm"].to(acc) + torch.linalg.vecdot(B, M)
        return sq.clamp(min=0).sqrt()  # out of place: vmap (stacked or mixed adapters) has no rule for clamp_


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    dtype = y.dtype
    m = leaves["magnitude"]
    g = (m / row_norm(leaves, site, x.dtype).to(m.dtype)).to(dtype)  # (d_out,)
    # g ⊙ (y − b) + b + s (x Aᵀ) (g ⊙ B)ᵀ, with g folded into B's rows (d_out × r) rather than into the
    # (…, d_out) update, and one full-size buffer: the adds go in place (autograd keeps y and g, not y ⊙ g).
    B = leaves["B"] * g[:, None].to(leaves["B"].dtype)
    out = (y * g).add_(lora.low_rank(x, leaves["A"], B, lora.scale(site.config)).to(dtype))
    bias = base_bias(site.module)
    if bias is not None:
        out = out.add_((1 - g) * bias.to(dtype))
    return out


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    updated, _ = lora.merge(weight, bias, leaves, site)
    norm = torch.linalg.vector_norm(updated, dim=1).detach()
    return (leaves["magnitude"].to(weight.dtype) / norm)[:, None] * updated, bias


VARIANT = Variant(
    name="dora",
    config=DoRAConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    frozen=("weight_sq_norm",),
)
