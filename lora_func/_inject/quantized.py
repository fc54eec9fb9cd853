"""bitsandbytes layers under torch.func transforms and in mixed batches run through `QuantizedLinear`
(`lora_func/kinds/linear.py`): bnb's autograd.Functions refuse torch.func and its kernels have no vmap rule. The
layer's `forward` attribute is a dispatcher while an injection is open; other threads get bnb's own."""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import _torch_private as private
from .._transform import in_transform
from ..kinds.linear import QuantizedLinear
from .dispatch import injection_of
from .state import MISSING


def routed(module: nn.Module, own: Any, *args, **kwargs):
    """A bnb layer's forward while an injection is open: `QuantizedLinear` where this call needs it."""
    injection = injection_of(module, private.graph_task_id())
    if injection is not None and (injection.rows is not None or in_transform()):
        return QuantizedLinear.apply(args[0], module)
    if own is MISSING:
        return type(module).forward(module, *args, **kwargs)
    return own(*args, **kwargs)


class Restore:
    """Puts back a module's own instance-level `forward` (or its absence)."""

    def __init__(self, module: nn.Module, own: Any) -> None:
        self.module, self.own = module, own

    def remove(self) -> None:
        if self.own is MISSING:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.own
