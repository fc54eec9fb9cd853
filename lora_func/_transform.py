"""Whether code runs inside a torch.func transform or torch.compile tracing."""

from __future__ import annotations

import torch


def in_transform() -> bool:
    """Inside torch.func (grad/vmap/...) or torch.compile tracing, where backward runs inside the transform."""
    return torch._C._functorch.peek_interpreter_stack() is not None or torch.compiler.is_compiling()
