"""VBLoRA as PEFT's VBLORA: per-target `vblora_logits_A`/`vblora_logits_B`, the shared trainable
`base_model.vblora_vector_bank`.

PEFT's `save_only_topk_weights=True` files hold, instead of each logits tensor, its top-k indices
(`<leaf>_topk_indices`, the smallest integer dtype for `num_vectors`) and the first k − 1 softmax weights
(`<leaf>_topk_weights`, the last being 1 − their sum). PEFT loads them for inference, as logits log(w) at the
indices and −inf elsewhere; lora_func's leaves must be finite, so the others hold log(tiny) − 1 (tiny the dtype's
smallest normal), below every kept logit, and a kept weight of 0 holds log(tiny): the same top-k indices, and
softmax weights equal to PEFT's to rounding. `to_peft` writes that compact file when the config's
`save_only_topk_weights` is true (as PEFT's `save_pretrained`), the full logits otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._config import AdapterConfig
from ._fields import number
from ._method import PeftMethod, flag

LOGITS = ("vblora_logits_A", "vblora_logits_B")
BANK = "base_model.vblora_vector_bank"


def fields_out(cfg: AdapterConfig, written: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "num_vectors": cfg.num_vectors,
        "vector_length": cfg.vector_length,
        "topk": cfg.topk,
        "save_only_topk_weights": cfg.save_only_topk_weights,
        "init_vector_bank_bound": cfg.init_vector_bank_bound,
        "init_logits_std": cfg.init_logits_std,
    }


def fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {"save_only_topk_weights": flag(fields, "save_only_topk_weights", where)}
    for name, default in (("num_vectors", 256), ("vector_length", 256), ("topk", 2)):
        out[name] = number(fields.get(name, default), f"`{name}`", where, rank=True)
    for name, default in (("init_vector_bank_bound", 0.02), ("init_logits_std", 0.1)):
        out[name] = number(fields.get(name, default), f"`{name}`", where, rank=False)
    return out


def index_dtype(num_vectors: int) -> torch.dtype:
    """PEFT's choice for the top-k indices: the smallest integer dtype that holds `num_vectors`."""
    for dtype, bound in ((torch.uint8, 2**8), (torch.int16, 2**15), (torch.int32, 2**31)):
        if num_vectors < bound:
            return dtype
    return torch.int64


def tensors_in(tensors: dict[str, torch.Tensor], fields: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """A `save_only_topk_weights` file's indices and weights as full, finite logits; other files as they are."""
    if not flag(fields, "save_only_topk_weights", where):
        return tensors
    num_vectors = number(fields.get("num_vectors", 256), "`num_vectors`", where, rank=True)
    topk = number(fields.get("topk", 2), "`topk`", where, rank=True)
    out = dict(tensors)
    for key in tensors:
        if not key.endswith("_topk_indices"):
            continue
        stem = key.removesuffix("_topk_indices")
        indices, weights = out.pop(key), out.pop(f"{stem}_topk_weights", None)
        if weights is None or not weights.is_floating_point():
            raise ValueError(f"{where} key {key!r} has no floating {stem + '_topk_weights'!r} beside it")
        if (
            indices.is_floating_point()
            or indices.shape[-1:] != (topk,)
            or weights.shape != (*indices.shape[:-1], topk - 1)
        ):
            raise ValueError(
                f"{where} keys {key!r} and its `_topk_weights` have shapes {tuple(indices.shape)} and "
                f"{tuple(weights.shape)}, not (…, topk={topk}) and (…, topk − 1)"
            )
        indices = indices.long()
        if indices.numel() and (indices.min() < 0 or indices.max() >= num_vectors):
            raise ValueError(f"{where} key {key!r} holds indices outside [0, num_vectors={num_vectors})")
        weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
        if (weights < 0).any():
            raise ValueError(f"{where} key {stem + '_topk_weights'!r} holds negative weights or weights summing over 1")
        floor = torch.log(torch.tensor(torch.finfo(weights.dtype).tiny, dtype=weights.dtype))
        logits = torch.full((*indices.shape[:-1], num_vectors), (floor - 1).item(), dtype=weights.dtype)
        out[stem] = logits.scatter(-1, indices, torch.log(weights).clamp_min(floor))
    return out


def tensors_out(tensors: dict[str, torch.Tensor], cfg: AdapterConfig) -> dict[str, torch.Tensor]:
    """PEFT's `save_only_topk_weights` layout where the config asks for it (its `_get_adapter_state_dict`)."""
    if not cfg.save_only_topk_weights:
        return tensors
    out = {}
    for key, tensor in tensors.items():
        if key.rsplit(".", 1)[-1] in LOGITS:
            logits, indices = tensor.topk(cfg.topk)
            out[f"{key}_topk_indices"] = indices.to(index_dtype(cfg.num_vectors)).contiguous()
            out[f"{key}_topk_weights"] = torch.softmax(logits, dim=-1)[..., :-1].contiguous()
        else:
            out[key] = tensor
    return out


METHOD = PeftMethod(
    variant="vblora",
    peft_type="VBLORA",
    keys={"vblora_logits_A": "vblora_logits_A", "vblora_logits_B": "vblora_logits_B"},
    rank_fields=("r", None),
    alpha_fields=None,
    required={"fan_in_fan_out": False},
    kinds=("linear", "conv1d"),
    inert={"vblora_dropout": 0.0},  # training-only dropout
    fields_out=fields_out,
    fields_in=fields_in,
    handled=(
        "num_vectors",
        "vector_length",
        "topk",
        "save_only_topk_weights",
        "init_vector_bank_bound",
        "init_logits_std",
    ),
    shared_keys={"vblora_vector_bank": BANK},
    tensors_in=tensors_in,
    tensors_out=tensors_out,
)
