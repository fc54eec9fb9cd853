"""`all_reduce_grads`: data-parallel training of an adapter with `torch.distributed`.

Data parallel needs one thing beyond a single-process loop: every rank replaces its adapter gradient by the
mean over ranks before the optimizer step, so that all ranks take the same step from the same leaves. The
base model is frozen and never synchronised; only the adapter's (small) gradients travel, in one collective
per dtype. See docs/distributed.md for the whole recipe.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ._params import Params, split
from ._torch_private import pytree


def _average(tensors: list[torch.Tensor], group: Any) -> None:
    """Replace each tensor by its mean over the ranks of `group`, in place, one all_reduce per (dtype, device)."""
    world = dist.get_world_size(group)
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for bucket in buckets.values():
        flat = torch.cat([t.detach().reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat /= world
        offset = 0
        for t in bucket:
            t.detach().copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_grads(params: Any, *, group: Any = None) -> Any:
    """Average adapter gradients over the ranks of a `torch.distributed` process group, in place; returns `params`.

    Two forms, one per training style:
    - `params` from `lf.init`/`lf.load`, after `loss.backward()`: the `.grad` of every trainable leaf becomes its
      mean over ranks (a leaf with no `.grad` on a rank counts as zero there, so all ranks stay in step).
    - the gradient pytree that `torch.func.grad` returns (computed tensors, not leaves requiring grad; they
      require grad when the leaves did): every tensor in it becomes its mean over ranks.

    With each rank's loss the mean over its equal share of the global batch, the result is the gradient of the
    global batch's mean loss, as with DDP. Every rank must call it with the same structure.

    Data-parallel recipe (docs/distributed.md): every rank builds the same base model and the same adapter
    (`lf.init(..., seed=s)` with one `s`), takes its equal share of each global batch, and calls this between
    `backward()` and `optimizer.step()`; rank 0 saves.

    >>> dist.init_process_group("gloo")  # or "nccl"; torchrun sets the rank and world size
    >>> params = lf.init(model, cfg, seed=0)
    >>> optimizer = torch.optim.AdamW(lf.trainable_leaves(params), lr=1e-4)
    >>> lf.apply(model, params, local_batch).loss.backward()
    >>> lf.all_reduce_grads(params)  # on every rank, before optimizer.step()
    >>> optimizer.step(); optimizer.zero_grad()
    >>> grads = lf.all_reduce_grads(torch.func.grad(loss_fn)(trainable))  # the torch.func style
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("all_reduce_grads: torch.distributed is not initialized (call dist.init_process_group)")
    if isinstance(params, Params):
        leaves = [t for _, _, t in split(params)[0].leaves()]
        # Leaves that autograd fills (.grad): tensors requiring grad that no op produced. The gradients that
        # torch.func.grad returns for leaves requiring grad require grad themselves, but an op produced them.
        live = [t.requires_grad and t.is_leaf for t in leaves]
        if any(live):
            if not all(live):
                raise ValueError(
                    "all_reduce_grads: `params` mixes trainable leaves (requiring grad) with other tensors; give "
                    "the adapter after backward(), or the gradients torch.func.grad returned"
                )
            for t in leaves:
                if t.grad is None:
                    t.grad = torch.zeros_like(t)
            _average([t.grad for t in leaves], group)
            return params
    tensors = pytree.tree_leaves(params)
    bad = [type(t).__name__ for t in tensors if not isinstance(t, torch.Tensor)]
    if bad:
        raise TypeError(f"all_reduce_grads: `params` must hold tensors only, found {sorted(set(bad))}")
    _average(tensors, group)
    return params
