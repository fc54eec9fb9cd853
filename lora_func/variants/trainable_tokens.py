"""Trainable Tokens: train the embedding rows of chosen token ids; every other row, and the rest of the model, stay.

    W' = W with rows token_indices replaced by the leaf D (n, d):  W'[t_j] = D_j
    y' = W'[x] (· embed_scale)  =  D_j where x = t_j, else y

The rows are replaced, not shifted, as PEFT does (`trainable_tokens_delta` holds the new rows themselves). The lookup
goes through the rows' slots with the layer's `padding_idx` and `scale_grad_by_freq` carried over, so values and
gradients are those of PEFT's lookup in W'. `r` and `alpha` are unused. `token_indices=None` (lora_func's default)
trains every row of each targeted embedding (PEFT's default, [], would train none; an empty tuple is refused).
Identity at init: D is a copy of W's rows (`init_weights=True`, PEFT's default), so W' = W.
A model that ties its output head to the embedding (`tie_word_embeddings=True`) sees the new rows at its input only:
lora_func adapts the targeted module alone (PEFT also swaps them into the tied head's weight).
Reference: peft/tuners/trainable_tokens/layer.py (`TrainableTokensLayer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._config import RULES, AdapterConfig
from .._kind import Target
from .._variant import Dense, Init, Leaves, PeftExchange, Recipe, Site, Variant
from ..kinds.embedding import embed_scale

LEAF = "trainable_tokens_delta"  # PEFT's parameter name


def _indices_rule(indices: tuple[int, ...] | None) -> str | None:
    if indices is None:
        return None
    if not indices:
        return "is empty: name the token ids to train (None trains every row)"
    if min(indices) < 0:
        return f"must hold token ids >= 0, got {min(indices)}"
    if len(set(indices)) != len(indices):
        return f"names a token twice: {sorted(i for i in set(indices) if indices.count(i) > 1)[:5]}"
    return None


RULES.setdefault("token_indices", _indices_rule)


@dataclass(frozen=True)
class TrainableTokensConfig(AdapterConfig):
    """Trainable Tokens (PEFT's `TrainableTokensConfig`): `token_indices` are the rows to train (None: all rows),
    `init_weights=False` starts them at random (standard normal, as PEFT draws them). With `target_names` None every
    embedding is a target; `exclude_names` leaves out `lm_head` only. `r` and `alpha` are unused."""

    exclude_names: tuple[str, ...] = ("lm_head",)
    token_indices: tuple[int, ...] | None = None
    init_weights: bool = True


def indices(target: Target, cfg: TrainableTokensConfig) -> tuple[int, ...]:
    if cfg.token_indices is None:
        return tuple(range(target.d_in))
    if max(cfg.token_indices) >= target.d_in:
        raise ValueError(
            f"TrainableTokensConfig: `token_indices` holds {max(cfg.token_indices)}, beyond the {target.d_in} rows "
            f"of {target.path!r}"
        )
    return cfg.token_indices


def shapes(target: Target, cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
    return {LEAF: (len(indices(target, cfg)), target.d_out)}


def create(target: Target, cfg: TrainableTokensConfig, init: Init) -> Leaves:
    rows = list(indices(target, cfg))
    if cfg.init_weights:
        return {LEAF: init.weight().t()[rows].clone()}  # W is read (d, num_embeddings)
    return {LEAF: torch.randn(len(rows), target.d_out, generator=init.generator)}


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    module, rows = site.base.module, leaves[LEAF]
    chosen = indices(site.target, site.config)
    n = len(chosen)
    slot = torch.full((site.target.d_in,), n, dtype=torch.long, device=x.device)  # row n: not a chosen token
    slot[list(chosen)] = torch.arange(n, device=x.device)
    slots = slot[x]
    table = torch.cat([rows, rows.new_zeros(1, rows.shape[-1])])
    pad = module.padding_idx
    pad = int(slot[pad]) if pad is not None else None  # a chosen padding row gets no gradient, as in PEFT's lookup
    out = F.embedding(slots, table.to(y.dtype), padding_idx=pad, scale_grad_by_freq=module.scale_grad_by_freq)
    scale = embed_scale(module)
    if scale is not None:
        out = out * (scale.to(out.dtype) if isinstance(scale, torch.Tensor) else scale)
    return torch.where((slots < n).unsqueeze(-1), out, y)


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    index = torch.tensor(indices(site.target, site.config), device=weight.device)
    return weight.index_copy(1, index, leaves[LEAF].t().to(weight.dtype)), bias


VARIANT = Variant(
    name="trainable_tokens",
    config=TrainableTokensConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    kinds=("embedding",),
    capabilities=(
        Dense(),
        PeftExchange("trainable_tokens"),
        Recipe(lr=1e-3),
    ),
)
