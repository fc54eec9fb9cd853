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

import functools

import torch


@functools.cache
def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: object) -> bool:
    """Whether `tensor` is a `DTensor` (a parameter that FSDP2 or tensor parallelism placed over ranks)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from every rank for a `DTensor` (a collective: every rank of its mesh calls it
    for the same tensors in the same order), else `tensor` itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def placed_like(tensor: torch.Tensor, like: object) -> torch.Tensor:
    """`tensor` (whole, the same on every rank) as a `DTensor` with the mesh and placements of `like` where `like`
    is one, each rank keeping its own slice (no communication); else `tensor`. Differentiable."""
    if not is_sharded(like):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor, like.device_mesh, like.placements, src_data_rank=None)
