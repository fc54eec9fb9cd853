"""Embeddings: `nn.Embedding`, targeted when `target_names` names it (the default `exclude_names` leaves out
`embed_tokens`: set `exclude_names=()` or your own to adapt it).

    y = W[x],   W stored (num_embeddings, d)          read as Wᵀ: (d_out, d_in) = (d, num_embeddings)

LoRA as PEFT does it (`lora_embedding_A/B`): A (r, num_embeddings) is looked up as an embedding table Aᵀ,
B (d, r) maps the result:

    y' = y + s · Aᵀ[x] Bᵀ,     ΔW = (B A)ᵀ in the stored layout

with the layer's `padding_idx`, `scale_grad_by_freq` and `sparse` applied to the lookup, and the layer's
`embed_scale` (Gemma's scaled embeddings) to the update, as PEFT does. PEFT's init: A = 0, B normal, so the
adapter starts as the identity; there is no adapter dropout on an embedding (PEFT's `lora_dropout` is not
applied there either). A layer with `max_norm` renormalises its weight in place at every lookup: not a target.
Reference: peft/tuners/lora/layer.py (`Embedding`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._kind import BaseLayer, Kind, Target
from . import linear


def is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


def describe(path: str, module: nn.Module, roles) -> Target:
    if module.max_norm is not None:
        raise ValueError(
            f"{path!r} (Embedding) has `max_norm`={module.max_norm}: its lookup renormalises the weight in place, "
            "which an adapter cannot do without changing the model"
        )
    d_in, d_out = module.num_embeddings, module.embedding_dim
    return Target(path, d_in, d_out, roles(d_in, d_out), "embedding", type(module).__name__)


def check(module: nn.Module, target: Target) -> str | None:
    if not is_embedding(module):
        return f"is a {type(module).__name__}, not an embedding"
    if (module.num_embeddings, module.embedding_dim) != (target.d_in, target.d_out):
        return (
            f"is {module.num_embeddings} x {module.embedding_dim} in the model, "
            f"the adapter holds {target.d_in} x {target.d_out}"
        )
    return None


def weight(base: BaseLayer) -> torch.Tensor:
    return base.module.weight.detach().to(torch.float32).t()  # (d, num_embeddings)


def embed_scale(module: nn.Module) -> torch.Tensor | float | None:
    """The layer's `embed_scale` (a scalar its forward multiplies by), as PEFT's `_get_embed_scale` reads it."""
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale.detach()
    return scale if isinstance(scale, (int, float)) else None


def low_rank(base: BaseLayer, x, A, B, s: float, y):
    module = base.module
    dtype = A.dtype if y is None else y.dtype
    h = F.embedding(  # (..., r): rows of Aᵀ
        x,
        A.t(),
        padding_idx=module.padding_idx,
        scale_grad_by_freq=module.scale_grad_by_freq,
        sparse=module.sparse,
    )
    out = (h @ B.t()) * s  # (..., d)
    scale = embed_scale(module)
    if scale is not None:
        out = out * (scale.to(out.dtype) if isinstance(scale, torch.Tensor) else scale)
    return out.to(dtype) if y is None else y + out.to(dtype)


def init_low_rank(target: Target, cfg, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """PEFT's embedding init: A = 0, B standard normal."""
    shapes = linear.low_rank_shapes(target, cfg)
    return {"A": torch.zeros(shapes["A"]), "B": torch.randn(shapes["B"], generator=generator)}


def state(base: BaseLayer, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {"weight": weight.t().contiguous().to(base.module.weight.dtype)}  # back to (num_embeddings, d)


KIND = Kind(
    name="embedding",
    recognise=is_embedding,
    describe=describe,
    check=check,
    weight=weight,
    bias=lambda base: None,
    state=state,
    low_rank_shapes=linear.low_rank_shapes,
    init_low_rank=init_low_rank,
    low_rank=low_rank,
    low_rank_delta=linear.matrix_delta,
)
