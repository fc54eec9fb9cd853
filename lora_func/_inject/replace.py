"""Targets injected by parameters (`lora_func/kinds/`, `form_of`: fused MoE experts, `modules_to_save` copies): for
the module's forward, in this thread, a `TorchFunctionMode` hands its ops the replacement tensors (W + ΔW, the
copies) in place of those parameters, the way base parameters are handed out detached (`detach.py`); the module's
parameters themselves stay as they are."""

from __future__ import annotations

from .. import _torch_private as private
from .detach import Detached
from .dispatch import injection_of, refuse_unseen_checkpoint
from .state import per_thread, thread_state
from .unwind import heal


def parameters_pre_hook(module, args, *rest):
    """A module injected by parameters (fused experts, a saved copy): for its forward, in this thread, its ops see
    the replacement tensors in place of those parameters (computed per call, so a recompute computes them again)."""
    task = private.graph_task_id()
    injection = injection_of(module, task)
    bindings = None if injection is None else injection.parameter_bindings.get(module)
    thread_state()
    replacing = per_thread.replacing
    if replacing:
        heal(replacing)
    depth = private.function_mode_depth()
    if not bindings:
        replacing.append((module, None, depth))
        return
    if task == -1:
        refuse_unseen_checkpoint(injection, module)
    # The parameter and its detached view (a detaching mode of a recompute may be entered after this one).
    detached = injection.detached() if injection.needs_detach else {}
    table = {}
    for fn, leaves, site in bindings:
        for name, tensor in fn(leaves, site).items():
            param = module._parameters[name]
            table[id(param)] = tensor
            if id(param) in detached:
                table[id(detached[id(param)])] = tensor
    mode = Detached(table)
    mode.__enter__()
    replacing.append((module, mode, depth))


def parameters_hook(module, args, *rest):
    replacing = getattr(per_thread, "replacing", None)
    if not replacing or replacing[-1][0] is not module:  # registered while this forward ran: nothing was pushed
        return
    _, mode, _ = replacing.pop()
    if mode is not None:
        mode.__exit__(None, None, None)
