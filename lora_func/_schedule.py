"""`schedule`, `schedule_state`, `regularizer`: what a method does to its adapter during training, and the extra
loss it needs, for the variants that declare one (`Schedule`, `Regularizer` in `Variant.capabilities`); identity
and zero for the rest, so a training loop written with them works for every variant.

    state = lf.schedule_state(params)
    for step, batch in enumerate(batches):
        loss = lf.apply(model, params, batch).loss + lf.regularizer(params)
        loss.backward()
        optimizer.step()
        params, state = lf.schedule(params, state, step)   # after the step, before zero_grad(): reads .grad
        optimizer.zero_grad()

After the optimizer step, as PEFT's AdaLoRA calls its allocator: a schedule that fixes up a leaf (ReFT retracts R to
orthonormal rows, in place, so the optimizer keeps updating the same tensor) sees the step's result.
"""

from __future__ import annotations

from typing import Any

import torch

from ._params import Params, split
from ._structure import check
from ._variant import Regularizer, Schedule
from .variants import variant_for


def _variant(params: Any, caller: str):
    check(params, caller, stacked=False, halves=False)
    return params.variant or variant_for(params.config, caller=caller)


def schedule_state(params: Params) -> Any:
    """The schedule's initial state for `params` (None for a variant without a schedule)."""
    schedule = _variant(params, "schedule_state").capability(Schedule)
    return None if schedule is None else schedule.state(params)


def schedule(params: Params, state: Any, step: int, *, grads: Params | None = None) -> tuple[Params, Any]:
    """One step of the variant's training-time schedule: `(params, state)` after step `step` (an int >= 0).

    `grads`: the gradients of the trainable leaves, as `lf.split(params)[0]` holds them (the torch.func style);
    None reads the leaves' `.grad` (a torch.optim loop: after `optimizer.step()`, before `zero_grad()`). A variant
    without a schedule returns `params` and `state` as they are.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"schedule: `step` must be an int >= 0, got {step!r}")
    sched = _variant(params, "schedule").capability(Schedule)
    if sched is None:
        return params, state
    if grads is None:
        trainable = split(params)[0]
        grads = trainable.replace({p: {k: t.grad for k, t in e.items()} for p, e in trainable.items()})
    return sched.step(params, state, step, grads)


def regularizer(params: Params) -> torch.Tensor:
    """The extra training loss the variant needs (a scalar tensor), 0 for variants without one."""
    reg = _variant(params, "regularizer").capability(Regularizer)
    if reg is not None:
        return reg.loss(params)
    leaf = next(t for _, _, t in params.leaves())
    return leaf.new_zeros(())
