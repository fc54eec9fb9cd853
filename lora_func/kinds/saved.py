"""Trainable copies of whole modules (`modules_to_save`, PEFT's name), e.g. a new classification head.

    params[path][name] = a copy of the module's parameter `name` (its direct parameters; a saved module with
    submodules gives one entry per submodule that owns parameters)

The copies are leaves of the adapter: they train (all of them), are saved with it, and for the duration of
the module's forward replace its parameters (the parameter form); the model's own module is untouched.
`merge` returns them. They belong to no variant: every variant can carry them. Buffers (a BatchNorm's
running statistics) are not copied. Reference: peft/utils/other.py (`ModulesToSaveWrapper`).
"""

from __future__ import annotations

import torch
from torch import nn

from .._kind import BaseLayer, Kind, Target
from .._sharded import full


def _parameters(value) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """[[name, [dims]], ...] as stored, back to ((name, shape), ...)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"`parameters` must be a non-empty list of [name, shape] pairs, got {value!r}")
    out = []
    for item in value:
        ok = isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) and item[0]
        ok = ok and "." not in item[0] and isinstance(item[1], (list, tuple))
        ok = ok and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in item[1])
        if not ok:
            raise ValueError(f"`parameters` entries must be [name without dots, [dims]], got {item!r}")
        out.append((item[0], tuple(item[1])))
    if len({name for name, _ in out}) != len(out):
        raise ValueError(f"`parameters` names a parameter twice: {value!r}")
    return tuple(out)


def shapes_of(module: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((name, tuple(p.shape)) for name, p in module.named_parameters(recurse=False))


def describe(path: str, module: nn.Module, roles) -> Target:
    return Target(path, 0, 0, (), "saved", type(module).__name__, (("parameters", shapes_of(module)),))


def check(module: nn.Module, target: Target) -> str | None:
    if shapes_of(module) != target.get("parameters"):
        return (
            f"has parameters {dict(shapes_of(module))} in the model, the adapter holds {dict(target.get('parameters'))}"
        )
    return None


def leaf_shapes(target: Target) -> dict[str, tuple[int, ...]]:
    return dict(target.get("parameters"))


def create(base: BaseLayer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Copies of the module's parameters (a parameter FSDP2 sharded: gathered whole, this module's only)."""
    return {name: full(p.detach()).to(dtype, copy=True) for name, p in base.module.named_parameters(recurse=False)}


def parameters(base: BaseLayer, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The copies as the module's parameters, in the module's dtype."""
    own = dict(base.module.named_parameters(recurse=False))
    return {name: leaves[name].to(own[name].dtype) for name in own}


KIND = Kind(
    name="saved",
    recognise=None,
    describe=describe,
    check=check,
    parameter_form=True,
    layout_fields={"parameters": _parameters},
    leaf_shapes=leaf_shapes,
    create=create,
    parameters=parameters,
)
