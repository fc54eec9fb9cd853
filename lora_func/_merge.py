"""`merge`: the adapter folded into new weight tensors; the model is not changed."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ._params import Params
from ._sites import resolve_sites, with_shared
from ._structure import check
from .kinds import form_of, merged_parameters
from .variants import variant_for


def merge(model: nn.Module, params: Params) -> dict[str, torch.Tensor]:
    """New weights (state-dict keys of the targeted modules) with the adapter folded in.

    `torch.func.functional_call(model, lf.merge(model, params), batch)` equals `lf.apply(model, params, batch)`.
    Float bases keep their dtype; bitsandbytes bases are dequantized and returned in float32. Weights come in
    each module's own layout (transformers' Conv1D transposed, a conv's kernel shape); a fused-experts target's
    key is its parameter's name; a `modules_to_save` copy gives its module's parameters. A grouped convolution
    adapted by LoRA does not merge (an error names it). Differentiable with respect to `params`; `.detach()` the
    result to write a checkpoint. An enclosing `torch.autocast` does not reach the merge: the weights are computed
    at full precision, as outside it.

    >>> merged = lf.merge(model, params)
    >>> model_copy.load_state_dict(merged, strict=False)
    """
    check(params, "merge", stacked=False, model=model)
    variant = variant_for(params.config, caller="merge")
    merged: dict[str, torch.Tensor] = {}
    with _autocast_off({t.device.type for _, _, t in params.leaves()}):
        for _, site in resolve_sites(model, params, "merge"):
            _merge_site(variant, site, params, merged)
    return merged


def _merge_site(variant, site, params: Params, merged: dict[str, torch.Tensor]) -> None:
    path = site.target.path
    try:
        named = merged_parameters(variant, site, with_shared(params, path))
    except ValueError as e:
        raise ValueError(f"merge: {e}") from None
    prefix = form_of(variant, site.target).module_path
    for name, tensor in named.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"merge: the merged {name} of {path!r} has NaN or inf values")
        merged[f"{prefix}.{name}" if prefix else name] = tensor


def _autocast_off(device_types: set[str]) -> contextlib.ExitStack:
    """Autocast switched off on these device types (a merged weight is a weight, not an activation)."""
    stack = contextlib.ExitStack()
    for device in sorted(device_types):
        if torch.amp.is_autocast_available(device):
            stack.enter_context(torch.autocast(device, enabled=False))
    return stack
