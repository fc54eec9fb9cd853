"""`merge`: the adapter folded into new weight tensors; the model is not changed."""

from __future__ import annotations

import torch
from torch import nn

from ._params import Params
from ._sharded import parameter, placed_like
from ._sites import resolve_sites, with_shared
from ._structure import check
from .kinds import form_of, merged_parameters
from .variants import variant_for


def merge(model: nn.Module, params: Params) -> dict[str, torch.Tensor]:
    """New weights (state-dict keys of the targeted modules) with the adapter folded in.

    `torch.func.functional_call(model, lf.merge(model, params), batch)` equals `lf.apply(model, params, batch)`.
    Float bases keep their dtype; bitsandbytes bases are dequantized and returned in float32. Weights come in
    each module's own layout (transformers' Conv1D transposed, a conv's kernel shape), and placed as its parameter: on
    a base sharded by FSDP2 a `DTensor` holding this rank's slice (one layer is gathered at a time; `model.
    load_state_dict(merged, strict=False)` takes them as they are). A fused-experts target's
    key is its parameter's name; a `modules_to_save` copy gives its module's parameters. A grouped convolution
    adapted by LoRA does not merge (an error names it). Differentiable with respect to `params`; `.detach()` the
    result to write a checkpoint.

    >>> merged = lf.merge(model, params)
    >>> model_copy.load_state_dict(merged, strict=False)
    """
    check(params, "merge", stacked=False, model=model)
    variant = variant_for(params.config, caller="merge")
    merged: dict[str, torch.Tensor] = {}
    for _, site in resolve_sites(model, params, "merge"):
        path = site.target.path
        try:
            named = merged_parameters(variant, site, with_shared(params, path))
        except ValueError as e:
            raise ValueError(f"merge: {e}") from None
        prefix = form_of(variant, site.target).module_path
        for name, tensor in named.items():
            if not torch.isfinite(tensor).all():
                raise ValueError(f"merge: the merged {name} of {path!r} has NaN or inf values")
            # a sharded base (FSDP2): each rank keeps its slice, placed as the base parameter is
            merged[f"{prefix}.{name}" if prefix else name] = placed_like(tensor, parameter(site.base.module, name))
    return merged
