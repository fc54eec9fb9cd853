"""`cast`: an adapter in another dtype, its config saying so (so `save` writes it and `load` reads it back)."""

from __future__ import annotations

import dataclasses

import torch

from ._params import Params
from ._transform import in_transform


def cast(params: Params, dtype: torch.dtype | str) -> Params:
    """Every leaf of `params` in `dtype`, and `params.config.dtype` set to it.

    `lf.save` writes leaves in the config's dtype only, so this is how an adapter trained in float32 is
    stored in bfloat16 (half the file), and how a bfloat16 adapter comes back to float32 for training.
    Trainable leaves stay trainable: outside torch.func transforms each cast leaf is a new leaf tensor that
    requires grad as the original did (build the optimizer from the result); inside a transform the cast is
    an ordinary differentiable `.to`. A leaf already in `dtype` is the same tensor object.

    >>> lf.save(lf.cast(params, torch.bfloat16), "adapter-bf16.safetensors")
    >>> params = lf.cast(lf.load("adapter-bf16.safetensors", model), torch.float32)
    """
    if not isinstance(params, Params):
        raise TypeError(f"cast: `params` must be lora_func Params, got {type(params).__name__}")
    try:
        config = dataclasses.replace(params.config, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cast: `dtype` {dtype!r} is not a floating dtype ({e})") from None
    fresh = not in_transform()

    def to(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == config.dtype:
            return t
        if fresh:
            return t.detach().to(config.dtype).requires_grad_(t.requires_grad)
        return t.to(config.dtype)

    entries = {path: {leaf: to(t) for leaf, t in entry.items()} for path, entry in params.items()}
    return Params(entries, config, params.targets, params.frozen)
