"""Every private torch and optree name lora_func uses, in one place.

Any release may change or drop these (the pin is tested; see pyproject.toml). Each name below has a probe in
tests/contract/test_torch_private.py that fails with a message naming the API when a release changes it. The
rest of the package reaches them only through this module.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import optree
import torch
import torch.utils._pytree as pytree  # noqa: F401 - re-exported: torch's pytree registry (torch.func reads it)
from torch.autograd import Variable
from torch.utils.checkpoint import CheckpointFunction, checkpoint
from torch.utils.hooks import RemovableHandle

# -- the autograd engine --------------------------------------------------------------------------------------
graph_task_id: Callable[[], int] = torch._C._current_graph_task_id  # -1 outside a backward
sequence_nr: Callable[[], int] = torch._C._autograd._get_sequence_nr  # the next autograd node's number
graph_task_keep_graph: Callable[[], bool] = torch._C._autograd._get_current_graph_task_keep_graph
current_autograd_node: Callable[[], object] = torch._C._current_autograd_node  # the node running (backward)


def node_sequence_nr(node) -> int:
    """An autograd node's sequence number (`Node._sequence_nr`)."""
    return node._sequence_nr()


def queue_engine_callback(callback: Callable[[], None]) -> None:
    """Run `callback` when the running backward ends (`Variable._execution_engine.queue_callback`)."""
    Variable._execution_engine.queue_callback(callback)


_IDLE_LEAF, _IDLE_GRAD = torch.zeros((), requires_grad=True), torch.ones(())


def drop_stale_engine_tasks() -> None:
    """Drop the autograd tasks a failed backward left queued on this thread (`Variable._execution_engine.run_backward`).

    When a node raises, the engine ends that backward at once; the nodes that were ready to run stay in this thread's
    ready queue, each holding the graph below it, until the thread's next backward pops and skips them (a task whose
    backward is gone is popped before any live one). This is such a backward, of one leaf: no node runs, no op is
    called, no gradient is stored."""
    Variable._execution_engine.run_backward((_IDLE_LEAF,), (_IDLE_GRAD,), False, False, (_IDLE_LEAF,), False, False)


# -- torch function modes ---------------------------------------------------------------------------------------
function_mode_depth: Callable[[], int] = torch._C._len_torch_function_stack  # modes entered in this thread
function_mode_at: Callable[[int], object] = torch._C._get_function_stack_at  # the mode at a depth, outermost 0


# -- checkpointing ----------------------------------------------------------------------------------------------
def saved_tensors_hooks() -> tuple | None:
    """The innermost (pack, unpack) saved-tensor hooks of this thread, or None."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def is_checkpoint_hooks(hooks: tuple | None) -> bool:
    """Whether `hooks` (from `saved_tensors_hooks`) are non-reentrant `torch.utils.checkpoint`'s."""
    return hooks is not None and getattr(hooks[0], "__qualname__", "").startswith("_checkpoint_hook.")


# The frames a checkpointed function runs under: reentrant checkpointing calls it from `CheckpointFunction.forward`,
# non-reentrant from `checkpoint` itself (under its dynamo-disabling wrapper).
CHECKPOINT_CODES = frozenset((CheckpointFunction.forward.__code__, inspect.unwrap(checkpoint).__code__))


# -- torch.func -------------------------------------------------------------------------------------------------
def functorch_active() -> bool:
    """Inside a torch.func transform (grad, vmap, ...)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The tensor a torch.func transform wrapped (`grad`'s tracking wrapper: the caller's own tensor object), or `t`."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


# -- nn.Module's hook dicts -------------------------------------------------------------------------------------
# A hook is an entry in the first dict of its kind; the others flag it by the same key.
FORWARD_PRE_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
FORWARD_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs")
ALWAYS_CALLED = "_forward_hooks_always_called"


def new_hook_id() -> int:
    """A key for a module's hook dicts, unique as `register_forward_hook`'s own (`RemovableHandle.next_id`)."""
    key = RemovableHandle.next_id
    RemovableHandle.next_id += 1
    return key


# -- optree -----------------------------------------------------------------------------------------------------
OPTREE_GLOBAL_NAMESPACE: str = getattr(optree.registry, "__GLOBAL_NAMESPACE")  # plain optree calls see it


# -- torch.compile's stance -------------------------------------------------------------------------------------
def compile_stance() -> object | None:
    """The process's `torch.compiler.set_stance` state (`torch._dynamo.eval_frame._stance`); None when dynamo was
    never imported (then nothing was compiled)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return None if eval_frame is None else eval_frame._stance


def set_compile_stance(stance: object) -> bool:
    """Set a stance from `compile_stance` or `eager_stance`; False where torch refuses (inside compiled code)."""
    try:
        sys.modules["torch._dynamo.eval_frame"]._set_stance(stance)
    except RuntimeError:  # "attempted to set_stance in a torch.compile region"
        return False
    return True


def eager_stance(current: object) -> object:
    """`torch.compiler.set_stance("force_eager")`'s state, of the type of `current`."""
    return type(current)(stance="force_eager")
