"""Sharded base weights (torch's FSDP2, `fully_shard`; any `DTensor`): read one layer whole, give results back sharded.

Between forwards, a layer that FSDP2 has sharded holds its parameters as `DTensor`s, each rank a slice. What
lora_func computes from a base weight outside a forward (`init`'s SVDs and norms, `merge`, `delta_weights`)
needs the whole weight: `full` gathers one tensor when it is read, so at most one layer's weight is ever whole
on a rank, and drops it with the computation. Inside a forward FSDP2 has already gathered its layers' weights
into plain tensors; nothing here runs there.

The adapter itself stays plain and replicated: every rank holds all of it (see docs/distributed.md).
`placed_like` puts a result computed whole (a merged weight) back the way its base parameter is placed, so
`merge` on a sharded base returns each rank its own slice, as `model.state_dict()` does.
"""

from __future__ import annotations

import torch

# Imported once here rather than looked up per call: `is_sharded` runs in the structure check of every call,
# which torch.compile traces (and dynamo refuses cached wrappers such as functools.cache).
if torch.distributed.is_available():
    from torch.distributed.fsdp import FSDPModule as _FSDPModule
    from torch.distributed.tensor import DTensor as _DTensor
else:  # a torch build without torch.distributed
    _DTensor = _FSDPModule = None


def is_sharded(tensor: object) -> bool:
    """Whether `tensor` is a `DTensor` (a parameter that FSDP2 or tensor parallelism placed over ranks)."""
    return _DTensor is not None and isinstance(tensor, _DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from every rank for a `DTensor` (a collective: every rank of its mesh calls it
    for the same tensors in the same order), else `tensor` itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def placed_like(tensor: torch.Tensor, like: object) -> torch.Tensor:
    """`tensor` (whole, the same on every rank) as a `DTensor` with the mesh and placements of `like` where `like`
    is one, each rank keeping a copy of its own slice (no communication; the whole tensor is not kept alive);
    else `tensor`. Differentiable."""
    if not is_sharded(like):
        return tensor
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = like.device_mesh, like.placements
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, mesh, placements)
    local = tensor[tuple(slice(o, o + n) for o, n in zip(offset, shape))].clone()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=tensor.shape, stride=tensor.stride())


def parameter(module: object, name: str) -> torch.Tensor | None:
    """The parameter `name` (dotted) of `module`, or None."""
    try:
        return module.get_parameter(name)
    except AttributeError:
        return None


def is_fsdp_unit(module: object) -> bool:
    """Whether `fully_shard` has been applied to `module` (its class is FSDP2's `FSDP<name>` subclass)."""
    return _FSDPModule is not None and isinstance(module, _FSDPModule)


def model_class(model: object) -> type:
    """The model's own class: FSDP2 gives a module it shards a subclass `FSDP<name>` of it."""
    cls = type(model)
    if _FSDPModule is not None and issubclass(cls, _FSDPModule):
        return next(c for c in cls.__mro__ if not issubclass(c, _FSDPModule))
    return cls
