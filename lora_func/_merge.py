"""`merge`: the adapter folded into new weight tensors; the model is not changed."""

from __future__ import annotations

import torch
from torch import nn

from ._base import base_bias, dense_weight, quantization
from ._params import Params
from ._sites import resolve_sites, with_shared
from ._stack import stack_size
from .variants import variant_for


def merge(model: nn.Module, params: Params) -> dict[str, torch.Tensor]:
    """New weights (state-dict keys of the targeted modules) with the adapter folded in.

    `torch.func.functional_call(model, lf.merge(model, params), batch)` equals `lf.apply(model, params, batch)`.
    Float bases keep their dtype; bitsandbytes bases are dequantized and returned in float32.
    Differentiable with respect to `params`; `.detach()` the result to write a checkpoint.

    >>> merged = lf.merge(model, params)
    >>> model_copy.load_state_dict(merged, strict=False)
    """
    if not isinstance(params, Params):
        raise TypeError(f"merge: `params` must be lora_func Params, got {type(params).__name__}")
    variant = variant_for(params.config, caller="merge")
    count = stack_size(params, "merge")
    if count is not None:
        raise ValueError(f"merge: `params` stacks {count} adapters; merge each of lf.unstack(params)")
    merged: dict[str, torch.Tensor] = {}
    for module, site in resolve_sites(model, params, "merge"):
        path = site.target.path
        dtype = torch.float32 if quantization(module) else module.weight.dtype
        bias = base_bias(module)
        bias = None if bias is None else bias.float()
        weight, new_bias = variant.merge(dense_weight(module), bias, with_shared(params, path), site)
        if not torch.isfinite(weight).all():
            raise ValueError(f"merge: the merged weight of {path!r} has NaN or inf values")
        merged[f"{path}.weight"] = weight.to(dtype)
        if new_bias is not None and new_bias is not bias:
            if not torch.isfinite(new_bias).all():
                raise ValueError(f"merge: the merged bias of {path!r} has NaN or inf values")
            merged[f"{path}.bias"] = new_bias.to(dtype)
    return merged
