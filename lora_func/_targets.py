"""Which modules an adapter config selects: linear-like modules, roles, name and layer filters."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from torch import nn

from ._config import AdapterConfig

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Target:
    """One adapted module: its path in `model.named_modules()`, shape and roles."""

    path: str
    d_in: int
    d_out: int
    roles: tuple[str, ...]
    kind: str  # class name of the base module, e.g. "Linear", "Linear4bit"

    def __str__(self) -> str:
        return f"{self.path}  {self.kind}({self.d_in} -> {self.d_out})  {'+'.join(self.roles)}"


def is_linear_like(module: nn.Module) -> bool:
    """A module with `in_features`, `out_features` and a `weight` (nn.Linear, bnb Linear4bit/8bitLt, ...)."""
    return (
        isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
        and getattr(module, "weight", None) is not None
    )


def model_width(model: nn.Module) -> int | None:
    """d_model: `config.hidden_size` (or the text config's) where present, else the most common `in_features`."""
    config = getattr(model, "config", None)
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        width = getattr(text_config, "hidden_size", None)
        if isinstance(width, int):
            return width
    widths = Counter(m.in_features for m in model.modules() if is_linear_like(m))
    return widths.most_common(1)[0][0] if widths else None


def roles_of(d_in: int, d_out: int, width: int | None) -> tuple[str, ...]:
    roles = tuple(role for role, hit in (("reader", d_in == width), ("writer", d_out == width)) if hit)
    return roles or ("inner",)


def layer_index(path: str) -> int | None:
    match = _LAYER_INDEX.search(path)
    return int(match.group(1)) if match else None


def describe(path: str, module: nn.Module, width: int | None) -> Target:
    return Target(
        path=path,
        d_in=module.in_features,
        d_out=module.out_features,
        roles=roles_of(module.in_features, module.out_features, width),
        kind=type(module).__name__,
    )


def find_targets(model: nn.Module, cfg: AdapterConfig, *, caller: str = "targets") -> list[Target]:
    """The targets `cfg` selects in `model`, in `named_modules` order. Selecting nothing is an error."""
    width = model_width(model)
    selected: list[Target] = []
    name_hits: dict[str, list[str]] = {p: [] for p in cfg.target_names or ()}
    for path, module in model.named_modules():  # the root too: a bare nn.Linear is a model with one target
        if cfg.target_names is not None:
            matched = [p for p in cfg.target_names if re.search(p, path)]
            if not matched:
                continue
            for p in matched:
                name_hits[p].append(path)
        if not is_linear_like(module):
            continue
        if any(re.search(p, path) for p in cfg.exclude_names):
            continue
        if cfg.layers is not None and layer_index(path) not in cfg.layers:
            continue
        target = describe(path, module, width)
        if cfg.target_roles is not None and not set(cfg.target_roles) & set(target.roles):
            continue
        selected.append(target)

    # A name pattern that only hits modules which are not linear-like is a mistake worth naming.
    modules = dict(model.named_modules())
    for pattern, paths in name_hits.items():
        if paths and not any(is_linear_like(modules[p]) for p in paths):
            shown = ", ".join(f"{p} ({type(modules[p]).__name__})" for p in paths[:3])
            raise ValueError(
                f"{caller}: `target_names` pattern {pattern!r} matches only modules that are not linear-like "
                f"(need `in_features`, `out_features`, `weight`): {shown}"
            )
    if not selected:
        raise ValueError(
            f"{caller}: {type(cfg).__name__} selects no module of {type(model).__name__} "
            f"(target_roles={cfg.target_roles}, target_names={cfg.target_names}, "
            f"exclude_names={cfg.exclude_names}, layers={cfg.layers}, d_model={width})"
        )
    return selected
