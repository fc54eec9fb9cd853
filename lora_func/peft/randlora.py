"""RandLoRA as PEFT's RANDLORA: per-target `randlora_lambda`/`randlora_gamma`, shared `base_model.randlora_A`/`_B`.

`to_peft` always writes the bases (PEFT's `save_projection=True`), and, as PEFT's `save_pretrained` does, a copy of
them under every target (`<module>.randlora_A`/`_B`: each layer holds the shared buffers). On import each copy must
be bitwise the shared tensor, and is dropped. A file saved with `save_projection=False` holds only the per-target
values; its bases are drawn again from `projection_prng_key` as `lf.init` draws them, which is PEFT's draw.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from .._config import AdapterConfig
from ._fields import KEY_PREFIX, number
from ._method import PeftMethod, flag

SHARED_KEYS = {"randlora_A": "base_model.randlora_A", "randlora_B": "base_model.randlora_B"}


def fields_out(cfg: AdapterConfig, written: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "projection_prng_key": cfg.projection_prng_key,
        "randlora_alpha": cfg.randlora_alpha,
        "sparse": cfg.sparse,
        "very_sparse": cfg.very_sparse,
        "save_projection": True,
    }


def fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    flag(fields, "save_projection", where)
    key = fields.get("projection_prng_key", 0)
    if isinstance(key, bool) or not isinstance(key, int) or key < 0:
        raise ValueError(f"{where}: `projection_prng_key` must be an int >= 0, got {json.dumps(key)}")
    return {
        "projection_prng_key": key,
        "randlora_alpha": number(fields.get("randlora_alpha", 640), "`randlora_alpha`", where, rank=False),
        "sparse": flag(fields, "sparse", where),
        "very_sparse": flag(fields, "very_sparse", where),
    }


def tensors_in(tensors: dict[str, torch.Tensor], fields: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """Drop the per-target copies of the shared bases, each checked to be the shared tensor, bitwise."""
    out = dict(tensors)
    for key in tensors:
        leaf = key.rsplit(".", 1)[-1]
        if key.startswith(KEY_PREFIX) and leaf in SHARED_KEYS:
            shared = tensors.get(SHARED_KEYS[leaf])
            copy = out.pop(key)
            if shared is None or copy.shape != shared.shape or not torch.equal(copy, shared):
                raise ValueError(
                    f"{where} key {key!r} is not the shared {SHARED_KEYS[leaf]!r} (every RandLoRA layer of one adapter "
                    "uses the same bases)"
                )
    return out


def tensors_out(tensors: dict[str, torch.Tensor], cfg: AdapterConfig) -> dict[str, torch.Tensor]:
    """The shared bases also under every target, as PEFT's `save_pretrained` writes them."""
    out = dict(tensors)
    for key in tensors:
        if key.startswith(KEY_PREFIX) and key.endswith(".randlora_lambda"):
            module = key.removesuffix(".randlora_lambda")
            for leaf, shared in SHARED_KEYS.items():
                out[f"{module}.{leaf}"] = tensors[shared].clone()  # safetensors refuses shared storage
    return out


METHOD = PeftMethod(
    variant="randlora",
    peft_type="RANDLORA",
    keys={"randlora_lambda": "randlora_lambda", "randlora_gamma": "randlora_gamma"},
    rank_fields=("r", None),
    alpha_fields=None,
    required={"fan_in_fan_out": False},
    kinds=("linear", "conv1d"),
    inert={"randlora_dropout": 0.0, "init_weights": True},  # training-only dropout; init-time only
    absent=("exclude_modules",),
    fields_out=fields_out,
    fields_in=fields_in,
    handled=("projection_prng_key", "randlora_alpha", "sparse", "very_sparse", "save_projection"),
    shared_keys=SHARED_KEYS,
    shared_stored=lambda fields: fields.get("save_projection", True) is True,
    tensors_in=tensors_in,
    tensors_out=tensors_out,
)
