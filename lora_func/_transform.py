"""Whether code runs inside a torch.func transform or torch.compile tracing."""

from __future__ import annotations

import torch

from ._torch_private import functorch_active


def in_transform() -> bool:
    """Inside torch.func (grad/vmap/...) or torch.compile tracing, where backward runs inside the transform."""
    return functorch_active() or torch.compiler.is_compiling()
