"""Every private torch (and optree) name lora_func uses, in one place.

Any torch release may change or drop these. Each has a probe in tests/contract/test_torch_private.py that fails
with a message naming the API; `PROBES` lists what those tests check. Code elsewhere in the package imports
from here, never from `torch._C` or `torch.utils._pytree` directly.
"""

from __future__ import annotations

import inspect

import torch
from torch.utils.checkpoint import CheckpointFunction, checkpoint


def function_mode_stack() -> list:
    """The torch function modes entered in this thread, innermost last."""
    return [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]


def function_mode_depth() -> int:
    """How many torch function modes this thread has entered."""
    return torch._C._len_torch_function_stack()


def function_mode_at(index: int):
    return torch._C._get_function_stack_at(index)


def saved_tensors_hooks() -> tuple | None:
    """The (pack, unpack) saved-tensor hooks innermost in this thread, or None."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def is_checkpoint_hooks(hooks: tuple | None) -> bool:
    """Whether `hooks` (from `saved_tensors_hooks`) are non-reentrant `torch.utils.checkpoint`'s."""
    return hooks is not None and getattr(hooks[0], "__qualname__", "").startswith("_checkpoint_hook.")


# The frames of `torch.utils.checkpoint` a checkpointed function runs under: reentrant checkpointing calls it
# from `CheckpointFunction.forward`, non-reentrant from `checkpoint` itself.
CHECKPOINT_CODES = frozenset((CheckpointFunction.forward.__code__, inspect.unwrap(checkpoint).__code__))
