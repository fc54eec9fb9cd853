"""Where an adapter acts: each target of `params` located in the model, and the leaves its variant sees."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._config import config_for
from ._params import SHARED, Params
from ._targets import is_linear_like
from ._variant import Site


def call_model(model: nn.Module, batch: Any, overrides: Mapping[str, torch.Tensor] | None = None) -> Any:
    """`model(**batch)` for a Mapping, `model(*batch)` for a tuple/list, else `model(batch)`."""
    if isinstance(batch, Mapping):
        args, kwargs = (), dict(batch)
    elif isinstance(batch, (tuple, list)):
        args, kwargs = tuple(batch), {}
    else:
        args, kwargs = (batch,), {}
    if overrides:
        return torch.func.functional_call(model, dict(overrides), args, kwargs)
    return model(*args, **kwargs)


def resolve_sites(
    model: nn.Module, params: Params, caller: str, modules: Mapping[str, nn.Module] | None = None
) -> list[tuple[nn.Module, Site]]:
    """Each target of `params` located in `model` (or in `modules`, its `named_modules()` when the caller has
    them already), checked against its recorded shape."""
    sites = []
    for target in params.targets:
        module = _submodule(model, target.path) if modules is None else modules.get(target.path)
        if module is None:
            raise ValueError(f"{caller}: target {target.path!r} is not a module of {type(model).__name__}")
        if not is_linear_like(module):
            raise ValueError(f"{caller}: target {target.path!r} is a {type(module).__name__}, not linear-like")
        if (module.in_features, module.out_features) != (target.d_in, target.d_out):
            raise ValueError(
                f"{caller}: target {target.path!r} is {module.in_features} -> {module.out_features} in the model, "
                f"but the adapter was built for {target.d_in} -> {target.d_out}"
            )
        cfg = params.config
        # config_for is an lru_cache, which torch.compile warns about: only call it when it has work to do.
        target_cfg = config_for(cfg, target.path) if cfg.rank_pattern or cfg.alpha_pattern else cfg
        sites.append((module, Site(target, target_cfg, module)))
    return sites


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def with_shared(params: Params, path: str) -> dict[str, torch.Tensor]:
    """A target's leaves, plus the shared ones (VeRA) where the adapter has them."""
    leaves = params[path]
    if SHARED in params:
        return {**params[SHARED], **leaves}
    return leaves
