"""DoRA: a learned magnitude per output row times the row-normalised LoRA-updated weight.

    W' = diag(m / n) (W + s B A),     n_i = ‖W_i + s (B A)_i‖  (detached, as in PEFT)
    y' = (m / n) ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ) + b          (the bias is not rescaled, as in PEFT)

n is never built from a d_out × d_in product. With W Aᵀ from the base layer run on A's r rows:

    n_i² = ‖W_i‖² + 2 s Σ_k B_ik (W Aᵀ)_ik + s² B_i (A Aᵀ) B_iᵀ

where ‖W_i‖² is a frozen leaf computed once at init from the dequantized weight, so the same code
runs on bitsandbytes bases. On a convolution the rows are output channels, W_i the flattened kernel of
channel i and A its flattened (r, d_in·∏kernel) kernels (PEFT's `_DoraConvNdLayer`); a grouped convolution
is refused (its B A is not a grouped kernel, so ‖W_i + s (B A)_i‖ is not a norm of the layer's weight).
`r`, `alpha`, `use_rslora`, `dropout` mean what they mean for LoRA. With dropout in training, the rescaled
base term is computed on the dropped input, as PEFT does: y' = y + (m/n − 1) ⊙ W x̃ + (m/n) ⊙ s B A x̃.
Identity at init: B = 0 and m = √‖W_i‖², so m / n is exactly 1.
Liu et al. 2024, arXiv 2402.09353. Reference: peft/tuners/lora/dora.py (`DoraLinearLayer.forward`),
peft/tuners/lora/variants.py (`DoraLinearVariant.forward`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._config import AdapterConfig
from .._variant import LINEAR_LIKE, Dense, Init, Leaves, Padding, PeftExchange, Recipe, Site, Variant
from . import lora


@dataclass(frozen=True)
class DoRAConfig(AdapterConfig):
    """DoRA (PEFT's `LoraConfig(use_dora=True)`). `r`, `alpha` as for LoRA: the update is s·B A with
    s = alpha / r (alpha / √r with `use_rslora=True`). `dropout`: PEFT's `lora_dropout`."""

    use_rslora: bool = False
    dropout: float = 0.0


def shapes(target, cfg) -> dict[str, tuple[int, ...]]:
    if target.kind == "conv" and target.get("groups") != 1:
        raise ValueError(
            f"DoRAConfig cannot adapt {target.path!r} ({target.module}, groups={target.get('groups')}): LoRA's A reads "
            "every input channel, so the updated weight is not a grouped kernel whose rows DoRA could normalise"
        )
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
    A, B = leaves["A"].detach().flatten(1), leaves["B"].detach().flatten(1).to(acc)  # (r, fan_in), (d_out, r)
    with torch.no_grad():
        # A Wᵀ through the base layer's own kernel where it has one (a bnb weight is not dequantized).
        WA = site.base.project(A.to(dtype)).to(acc)  # (r, d_out)
        A = A.to(acc)
        M = torch.addmm(WA.t(), B, A @ A.t(), beta=2 * s, alpha=s * s)  # 2s W Aᵀ + s² B (A Aᵀ), (d_out, r)
        # Σ_k B_ik M_ik = 2s W_i · (B A)_i + s² ‖(B A)_i‖²
        sq = leaves["weight_sq_norm"].to(acc) + torch.linalg.vecdot(B, M)
        return sq.clamp(min=0).sqrt()  # out of place: vmap (stacked or mixed adapters) has no rule for clamp_


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    base, dtype, s = site.base, y.dtype, lora.scale(site.config)
    m = leaves["magnitude"]
    g = (m / row_norm(leaves, site, x.dtype).to(m.dtype)).to(dtype)  # (d_out,)
    # g folded into B's rows (d_out × r) rather than into the (…, d_out) update.
    B = leaves["B"] * g.reshape(-1, *(1,) * (leaves["B"].dim() - 1)).to(leaves["B"].dtype)
    bias = base.bias
    dropped = lora.input_dropout(x, site)
    if dropped is not x:  # y + (g − 1) ⊙ W x̃ + s B' A x̃: the base term on the dropped input, as PEFT
        wx = base(dropped)
        if bias is not None:
            wx = wx - base.features(bias.to(dtype))
        return y + base.features(g - 1) * wx + base.low_rank(dropped, leaves["A"], B, s).to(dtype)
    # g ⊙ (y − b) + b + s B' A x, one full-size buffer: the adds go in place (autograd keeps y and g, not y ⊙ g).
    out = (y * base.features(g)).add_(base.low_rank(x, leaves["A"], B, s).to(dtype))
    if bias is not None:
        out = out.add_(base.features((1 - g) * bias.to(dtype)))
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
    kinds=(*LINEAR_LIKE, "conv"),
    capabilities=(
        Dense(),
        Padding(axes=(("A", 0), ("B", 1))),
        PeftExchange("dora"),
        Recipe(lr=2e-3),
    ),
)
