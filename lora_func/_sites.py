"""Where an adapter acts: each target of `params` located in the model, and the leaves its variant sees."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._params import SHARED, Params
from ._variant import Site
from .kinds import refuse_offloaded, site_for


def call_args(batch: Any) -> tuple[tuple, dict[str, Any]]:
    """The (args, kwargs) of a batch: `**batch` for a Mapping, `*batch` for a tuple/list, else `(batch,)`."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def call_model(model: nn.Module, batch: Any, overrides: Mapping[str, torch.Tensor] | None = None) -> Any:
    """`model(**batch)` for a Mapping, `model(*batch)` for a tuple/list, else `model(batch)`."""
    args, kwargs = call_args(batch)
    if overrides:
        return torch.func.functional_call(model, dict(overrides), args, kwargs)
    return model(*args, **kwargs)


def resolve_sites(
    model: nn.Module, params: Params, caller: str, modules: Mapping[str, nn.Module] | None = None
) -> list[tuple[nn.Module, Site]]:
    """Each target of `params` located in `model` (or in `modules`, its `named_modules()` when the caller has
    them already) and checked against it (`lora_func.kinds.site_for`): (the module it acts on, its site)."""
    refuse_offloaded(model, caller)
    sites = []
    for target in params.targets:
        site = site_for(model, target, params.config, caller, modules)
        sites.append((site.base.module, site))
    return sites


def with_shared(params: Params, path: str) -> dict[str, torch.Tensor]:
    """A target's leaves, plus the shared ones (VeRA) where the adapter has them."""
    leaves = params[path]
    if SHARED in params:
        return {**params[SHARED], **leaves}
    return leaves
