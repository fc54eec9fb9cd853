"""The dispatchers of targets: which injection a forward belongs to (this thread's, or in a backward the recomputed
layer's), and the hooks that run the adapter's forward on a target's output or input. The model's hook dicts are
shared by every thread; an adapter must not be: a dispatcher looks up what to do in *this thread's* table, so a
plain call in another thread finds nothing and computes the base model, and two threads with two adapters each
find their own.

`torch.utils.checkpoint` that lora_func did not set up (the model's own, or HF checkpointing switched on inside the
block) is refused at the forward (`refuse_unseen_checkpoint`): its recompute would not see the adapter.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import _torch_private as private
from .checkpoint import recompute_call
from .state import per_thread

if TYPE_CHECKING:
    from .block import Injection


def injection_of(module: nn.Module, task: int) -> Injection | None:
    """The injection this module's forward belongs to: this thread's; in a backward, the recomputed layer's.

    In a backward (`task` != -1) a forward is a recompute. Of an injected call of an HF checkpointed layer:
    its record says which injection (`recompute_call`). Of anything else, this thread's injection applies
    only if it was opened inside this very backward (a user's own checkpoint around `lf.apply`); a block
    opened before the backward does not claim recomputes of calls made outside it (base-model outputs).
    """
    if task != -1:
        call = recompute_call(task)
        if call is not None:
            return call.injection
    active = getattr(per_thread, "active", None)
    injection = active.get(module) if active else None
    if injection is None or injection.task != task:
        return None
    if torch.compiler.is_compiling():
        injection.refuse_compiled_model()
    return injection


def output_hook(module, args, *rest):  # rest: (kwargs, output), or (output,) when registered as removal races
    task = private.graph_task_id()
    injection = injection_of(module, task)
    if injection is None:
        return None
    binding = injection.bindings.get(module)
    if binding is None or module in injection.inputs:  # another thread's adapter of the input form shares the module
        return None
    fn, leaves, site, inference = binding
    x = args[0] if args else next(iter(rest[0].values()))
    if task == -1:
        refuse_unseen_checkpoint(injection, module)
    if inference is not None and not module.training and not torch.is_grad_enabled():
        y = inference(x, rest[-1], leaves)
        if y is not None:
            return y
    return fn(x, rest[-1], leaves, site)


def input_hook(module, args, *rest):  # rest: (kwargs,), or () when registered as removal races
    task = private.graph_task_id()
    injection = injection_of(module, task)
    if injection is None:
        return None
    binding = injection.bindings.get(module)
    if binding is None or module not in injection.inputs:  # another thread's adapter of the output form shares it
        return None
    if task == -1:
        refuse_unseen_checkpoint(injection, module)
    fn, leaves, site, _ = binding
    if args:
        new_args = (fn(args[0], leaves, site), *args[1:])
        return (new_args, rest[0]) if rest else new_args
    kwargs = rest[0]
    key = next(iter(kwargs))
    return args, {**kwargs, key: fn(kwargs[key], leaves, site)}


def done_hook(module, args, *rest):
    """The model's call returned (not `always_call`): its layer calls' records belong to an output now."""
    injection = injection_of(module, private.graph_task_id())
    if injection is not None:
        injection.pending.clear()


def refuse_unseen_checkpoint(injection: Injection, module: nn.Module) -> None:
    """A target running inside `torch.utils.checkpoint` that no recorded HF layer set up (the model's own call,
    or HF checkpointing switched on inside the block) would be recomputed in backward without the adapter:
    reentrant checkpointing then gives no adapter gradient, silently, and non-reentrant fails inside torch."""
    if (
        per_thread.layers or torch.compiler.is_compiling()
    ):  # an HF checkpointed layer recorded; compiled: `injection_of`
        return
    if torch.is_grad_enabled():  # non-reentrant: the checkpoint's saved-tensor hooks, opened inside the block
        hooks = private.saved_tensors_hooks()
        if hooks is None or hooks == injection.saved_hooks or not private.is_checkpoint_hooks(hooks):
            return
    elif not (injection.grad_at_enter and module.training and _checkpoint_running()):  # reentrant: runs no_grad
        return
    raise RuntimeError(
        f"{injection.caller}: {name_of(injection.model, module)!r} runs inside torch.utils.checkpoint that "
        f"{injection.caller} did not set up (the model's own forward calls it, or HF gradient checkpointing was "
        "switched on inside the open block); backward would recompute it without the adapter. Switch the model's "
        "own checkpointing off, or enable HF checkpointing (model.gradient_checkpointing_enable()) before "
        f"lf.{injection.caller}, or wrap the whole lf.apply call in torch.utils.checkpoint"
    )


def _checkpoint_running() -> bool:
    """Whether a reentrant `torch.utils.checkpoint` call is on this thread's Python stack."""
    frame = sys._getframe(2)
    codes = private.CHECKPOINT_CODES
    for _ in range(200):
        if frame is None:
            return False
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def name_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name or "<root>"
    return type(module).__name__
