"""`merge`: the adapter folded into new weight tensors; the model is not changed."""

from __future__ import annotations

import contextlib

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
    result to write a checkpoint. An enclosing `torch.autocast` does not reach the merge: the weights are computed
    at full precision, as outside it.

    Tied weights are refused by name: a target whose weight another module shares (`tie_word_embeddings=True`,
    with `lm_head` or `embed_tokens` adapted) has no merged form that `functional_call` or `load_state_dict` can
    take, since writing the shared tensor changes its twin too, where `lf.apply` adapts the target alone. Give the
    target its own copy of the weight first (the error says how), or run the adapter unmerged.

    >>> merged = lf.merge(model, params)
    >>> model_copy.load_state_dict(merged, strict=False)
    """
    check(params, "merge", stacked=False, model=model)
    variant = variant_for(params.config, caller="merge")
    merged: dict[str, torch.Tensor] = {}
    names: dict[int, list[str]] = {}  # id(parameter) -> every name it has in the model
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    with autocast_off({t.device.type for _, _, t in params.leaves()}):
        for _, site in resolve_sites(model, params, "merge"):
            path = site.target.path
            try:
                named = merged_parameters(variant, site, with_shared(params, path))
            except ValueError as e:
                raise ValueError(f"merge: {e}") from None
            prefix = form_of(variant, site.target).module_path
            owner = model.get_submodule(prefix)
            for name, tensor in named.items():
                key = f"{prefix}.{name}" if prefix else name
                if not torch.isfinite(tensor).all():
                    raise ValueError(f"merge: the merged {name} of {path!r} has NaN or inf values")
                _refuse_tied(model, owner, prefix, name, names)
                # a sharded base (FSDP2): each rank keeps its slice, placed as the base parameter is
                merged[key] = placed_like(tensor, parameter(owner, name))
    return merged


def _refuse_tied(model: nn.Module, owner: nn.Module, path: str, name: str, names: dict[int, list[str]]) -> None:
    """A parameter that another module shares (tied embeddings) cannot take a merged value alone."""
    key = f"{path}.{name}" if path else name
    holder = owner.get_submodule(name.rpartition(".")[0])  # a saved module copy's names may be nested
    p = owner.get_parameter(name)
    twins = [n for n in names.get(id(p), ()) if model.get_submodule(n.rpartition(".")[0]) is not holder]
    if twins:
        raise ValueError(
            f"merge: {key!r} is tied to {twins[:3]} (one tensor, e.g. `tie_word_embeddings=True`): its merged "
            f"value would change {twins[0]!r} too, through functional_call or load_state_dict, where lf.apply "
            f"adapts {path!r} alone. Untie it first: `m = model.get_submodule({path!r}); m.{name} = "
            f"torch.nn.Parameter(m.{name}.detach().clone())` (and set `config.tie_word_embeddings = False` so "
            "that transformers does not tie it again), or run the adapter unmerged (lf.apply, lf.inject)"
        )


def autocast_off(device_types: set[str]) -> contextlib.ExitStack:
    """Autocast switched off on these device types (a merged weight or an initial leaf is a weight, not an
    activation: `merge` and `init` compute it in its own dtype inside a user's autocast block)."""
    stack = contextlib.ExitStack()
    for device in sorted(device_types):
        if torch.amp.is_autocast_available(device):
            stack.enter_context(torch.autocast(device, enabled=False))
    return stack
