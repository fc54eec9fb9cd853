"""Under torch.compile. The hooks are closures of the one call, swapped into the hook dicts (`SwappedHooks`:
`register_forward_hook` graph-breaks); backward is compiled ahead, nothing recomputes. Code compiled outside the
block ignores hooks added after it compiled (dynamo does not guard on them): while an eager block is open, compiled
code runs eagerly (`run_eager`), and the dispatchers refuse to be traced."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import _torch_private as private
from .state import EAGER, LOCK

if TYPE_CHECKING:
    from .block import Injection


def run_eager(enter: bool) -> bool:
    """While an eager block is open, compiled code runs eagerly (`torch.compiler.set_stance("force_eager")`), in
    every thread: a model compiled before the block would otherwise run its compiled code, which ignores hooks
    added after it compiled (dynamo does not guard on them), and give the base model's outputs in silence. Blocks
    are counted; the last to close puts back the stance the first found. Returns whether this block holds it."""
    with LOCK:
        if enter:
            current = private.compile_stance()
            if current is None:  # dynamo never imported: nothing compiled
                return False
            if EAGER[0] == 0:
                if not private.set_compile_stance(private.eager_stance(current)):
                    return False  # inside compiled code (a graph break): torch keeps its stance
                EAGER[1] = current
            EAGER[0] += 1
            return True
        EAGER[0] -= 1
        if EAGER[0] == 0:
            private.set_compile_stance(EAGER[1])
            EAGER[1] = None
        return False


class SwappedHooks:
    """A hook added under torch.compile, where `register_forward_hook` graph-breaks (its RemovableHandle
    bumps a class attribute) and item assignment on a module's hook dicts does too. Instead the module's
    hook dicts are replaced by copies holding the hook, and the originals put back by `remove`; dynamo
    traces both attribute writes. The originals are read through `__dict__`, which gives dynamo a
    reference to the objects themselves (a plain attribute read of an empty hook dict gives a fresh
    `{}`, and restoring that would leave the module with plain dicts instead of its own). Under compile
    the hooks never outlive the call, so restores run in reverse order of the swaps and nest correctly.
    """

    def __init__(self, module: nn.Module, hook: Any, pre: bool) -> None:
        names = private.FORWARD_PRE_HOOK_DICTS if pre else private.FORWARD_HOOK_DICTS
        self.module = module
        self.originals = [(name, module.__dict__[name]) for name in names]
        (_, hooks), (_, with_kwargs) = self.originals
        key = ("lora_func", len(hooks))
        swapped_hooks, swapped_kwargs = type(hooks)(hooks), type(with_kwargs)(with_kwargs)
        swapped_hooks[key] = hook
        swapped_kwargs[key] = True
        setattr(module, names[0], swapped_hooks)
        setattr(module, names[1], swapped_kwargs)

    def remove(self) -> None:
        for name, original in self.originals:
            setattr(self.module, name, original)


def enter_compiled(injection: Injection) -> None:
    """`Injection.__enter__` in compiled code: the adapter's hooks as closures swapped into the hook dicts."""
    if injection.needs_detach and torch.is_grad_enabled() and injection.caller != "apply":
        raise RuntimeError(
            f"{injection.caller}: under torch.compile, lf.inject cannot keep gradients out of base parameters that "
            "require grad; freeze the base (model.requires_grad_(False)) or call lf.apply inside the compiled code"
        )
    if injection.parameter_bindings:
        raise RuntimeError(
            f"{injection.caller}: under torch.compile, targets injected by replacing parameters (fused experts, "
            "`modules_to_save`) are not supported; run them eagerly"
        )
    injection.thread = 0  # entered (dynamo cannot trace threading.get_ident)
    injection.compiled = []
    for module, (fn, leaves, site, _) in injection.bindings.items():
        if module in injection.inputs:

            def pre_hook(mod, args, kwargs, fn=fn, leaves=leaves, site=site):
                if args:
                    return (fn(args[0], leaves, site), *args[1:]), kwargs
                key = next(iter(kwargs))
                return args, {**kwargs, key: fn(kwargs[key], leaves, site)}

            injection.compiled.append(SwappedHooks(module, pre_hook, pre=True))
        else:

            def hook(mod, args, kwargs, output, fn=fn, leaves=leaves, site=site):
                x = args[0] if args else next(iter(kwargs.values()))
                return fn(x, output, leaves, site)

            injection.compiled.append(SwappedHooks(module, hook, pre=False))
