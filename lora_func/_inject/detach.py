"""Keeping base gradients out: a freshly loaded HF model's parameters require grad, and an injected forward must not
put them in the autograd graph (no `.grad` on the base, no weight-gradient work in backward). Around the forward
(with grad on) of each module that owns such a parameter, a thread-local `TorchFunctionMode` hands each op a
detached view in place of the parameter. Only those modules' own ops pay for the mode (a Python call per op), not
attention, residuals or the adapter's ops, which are most of a launch-bound step's ops; a part of the model called
directly is covered the same way. A module that reads another module's parameter in its own forward is covered
when it owns one itself (`nn.MultiheadAttention` reads its `out_proj.weight`); one that owns none and reads a
descendant's parameter directly is not. Nothing of the model is replaced, not even for a moment: a parameter swap
(`functional_call`) would put tensors into the shared module, where every thread sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import _torch_private as private
from .dispatch import injection_of
from .state import per_thread, thread_state
from .unwind import heal

if TYPE_CHECKING:
    from .block import Injection

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed
    DTensor = ()  # isinstance(x, ()) is always False


def is_plain_parameter(p: torch.Tensor) -> bool:
    """A parameter whose `detach()` keeps what it is: plain tensors, and DTensors (FSDP2's sharded
    parameters). Not bnb weights: tensor subclasses whose detach() drops their quantization state."""
    return type(p) is nn.Parameter or type(p) is torch.Tensor or isinstance(p, DTensor)


class Detached(TorchFunctionMode):
    """Every op of this thread gets a detached view in place of the base parameters in `table` (by id)."""

    def __init__(self, table: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.table = table

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Called for every op of the module's forward: inlined, no call per argument.
        get = self.table.get
        args = [_swap(a, get) if type(a) in _SEQUENCES else get(id(a), a) for a in args]
        if kwargs:
            kwargs = {k: _swap(v, get) if type(v) in _SEQUENCES else get(id(v), v) for k, v in kwargs.items()}
            return func(*args, **kwargs)
        return func(*args)


_SEQUENCES = (list, tuple)  # torch.cat([w1, w2]), foreach ops


def _swap(value: list | tuple, get: Callable) -> list | tuple:
    return type(value)(get(id(v), v) for v in value)


def push_detached(module: nn.Module, injection: Injection | None) -> None:
    """Enter the injection's detaching mode in this thread for `module`'s forward (or note that none was)."""
    thread_state()
    modes = per_thread.modes
    if modes:
        heal(modes)
    depth = private.function_mode_depth()
    if injection is None or not injection.needs_detach or not torch.is_grad_enabled() or per_thread.detaching:
        modes.append((module, None, depth))
        return
    mode = injection.detaching_mode()
    injection.cover(module)
    mode.__enter__()
    per_thread.detaching += 1
    modes.append((module, mode, depth))


def pop_detached(module: nn.Module) -> None:
    modes = getattr(per_thread, "modes", None)
    if not modes or modes[-1][0] is not module:  # a hook registered while this forward ran: nothing was pushed
        return
    _, mode, _ = modes.pop()
    if mode is not None:
        per_thread.detaching -= 1
        mode.__exit__(None, None, None)


def detach_pre_hook(module, args, *rest):
    """A module that owns base parameters requiring grad: its ops see them detached, in an injected forward
    with grad on and in the recompute of an injected call of a checkpointed layer."""
    push_detached(module, injection_of(module, private.graph_task_id()))


def detach_hook(module, args, *rest):
    pop_detached(module)
