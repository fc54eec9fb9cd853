"""Trainable Tokens as PEFT's TRAINABLE_TOKENS: the new rows `trainable_tokens_delta` (n, d) on each targeted
embedding, `token_indices` the same list for all targets. `token_indices=None` (every row) is written as the full list
where the targets have one vocabulary size. PEFT's config has no rank, alpha, bias, layer or `modules_to_save`
fields. PEFT also swaps the rows into an output head tied to the embedding, which lora_func does not: a model whose
targeted embedding is tied to another module is refused both ways, by name."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from .._config import AdapterConfig
from .._params import Params
from ..variants.trainable_tokens import LEAF
from ._method import PeftMethod


def fields_out(cfg: AdapterConfig, written: Mapping[str, Any]) -> dict[str, Any]:
    return {"token_indices": list(cfg.token_indices) if cfg.token_indices is not None else None}


def fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    value = fields.get("token_indices")
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError(f"{where}: `token_indices` must be a list of ints, got {json.dumps(value)}")
    return {"token_indices": tuple(value)}


def checked(params):
    """`token_indices=None` written as every row: one vocabulary size for all targets."""
    cfg = params.config
    if cfg.token_indices is not None:
        return params
    sizes = {t.d_in for t in params.targets}
    if len(sizes) != 1:
        raise ValueError(
            f"to_peft: `token_indices`=None trains every row, and the targets have {sorted(sizes)} rows; PEFT's "
            "`token_indices` is one list for all targets"
        )
    every = dataclasses.replace(cfg, token_indices=tuple(range(sizes.pop())))
    return Params(dict(params.items()), every, params.targets)


def untied(model, targets, where: str) -> None:
    """PEFT's Trainable Tokens also puts the new rows into every module that shares the embedding's weight (an
    output head under `tie_word_embeddings=True`); lora_func adapts the embedding alone, so such a model is refused."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for target in targets:
        weight = model.get_submodule(target.path).weight
        twins = [n for n in owners.get(id(weight), []) if n != f"{target.path}.weight"]
        if twins:
            raise ValueError(
                f"{where}: {target.path}.weight is tied to {twins}, and PEFT's Trainable Tokens swaps the new rows "
                "into the tied module too, where lora_func adapts the embedding alone: the logits would differ. Give "
                "the output head its own copy of the weight first (untie it)"
            )


METHOD = PeftMethod(
    variant="trainable_tokens",
    peft_type="TRAINABLE_TOKENS",
    keys={LEAF: LEAF},
    rank_fields=None,
    alpha_fields=None,
    inert={"init_weights": True},  # init-time only
    absent=("exclude_modules", "layers_to_transform", "layers_pattern", "bias", "modules_to_save"),
    fields_out=fields_out,
    fields_in=fields_in,
    handled=("token_indices",),
    export_as=checked,
    kinds=("embedding",),
    check_model=untied,
)
