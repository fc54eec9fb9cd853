"""The hook registry: one dispatcher per (module, role), reference-counted across injections and threads, put into
the module's hook dicts and taken out under one lock. A copy of the model (`copy.deepcopy`, `torch.save`) holds
inert `Orphan`s where the original holds dispatchers."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from .. import _torch_private as private
from .checkpoint import layer_hook, layer_pre_hook
from .detach import detach_hook, detach_pre_hook
from .dispatch import done_hook, input_hook, output_hook
from .quantized import Restore, routed
from .replace import parameters_hook, parameters_pre_hook
from .state import HOOKED, LOCK, MISSING


class Hook:
    """A with-kwargs forward (pre-)hook put into the module's hook dicts, as `register_forward_hook` does but
    without building a RemovableHandle: `apply` registers and removes one per target on every call. The flags
    go in before the hook and come out after it, so a forward running in another thread meanwhile sees a
    consistent set (and the dispatchers take either calling convention)."""

    __slots__ = ("dicts", "key")

    def __init__(self, module: nn.Module, hook: Callable, *, pre: bool, always_call: bool = False) -> None:
        key = private.new_hook_id()
        names = private.FORWARD_PRE_HOOK_DICTS if pre else private.FORWARD_HOOK_DICTS
        if always_call:
            names = (*names, private.ALWAYS_CALLED)
        hooks, *flags = (module.__dict__[name] for name in names)
        for flag in flags:
            flag[key] = True
        hooks[key] = Dispatcher(hook)
        self.dicts, self.key = (hooks, *flags), key

    def remove(self) -> None:
        for d in self.dicts:
            d.pop(self.key, None)


class Dispatcher(partial):
    """A dispatcher as the module's hook dicts hold it: the hook itself (a `partial` calls it at C speed), but a
    copy of the module (`copy.deepcopy`, `torch.save`/`torch.load` of the whole model: EMA, teacher and reference
    models) gets an `Orphan` instead, which removes itself from the copy on its first call."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict) -> Orphan:
        return Orphan()

    def __reduce__(self):
        return (Orphan, ())


class Orphan:
    """What a copied model holds where the original held a dispatcher: inert, and gone after its first call."""

    __slots__ = ()

    def __call__(self, module: nn.Module, *args: Any) -> None:
        for names in _HOOK_DICTS:
            hooks = module.__dict__.get(names[0])
            if not hooks:
                continue
            for key in [k for k, v in hooks.items() if v is self]:
                for name in names:
                    module.__dict__.get(name, {}).pop(key, None)
        return None


_HOOK_DICTS = (private.FORWARD_PRE_HOOK_DICTS, (*private.FORWARD_HOOK_DICTS, private.ALWAYS_CALLED))


def _register(module: nn.Module, role: str) -> list:
    if role == "output":
        return [Hook(module, output_hook, pre=False)]
    if role == "input":
        return [Hook(module, input_hook, pre=True)]
    if role == "layer":
        return [Hook(module, layer_pre_hook, pre=True), Hook(module, layer_hook, pre=False, always_call=True)]
    if role == "detach":
        return [Hook(module, detach_pre_hook, pre=True), Hook(module, detach_hook, pre=False, always_call=True)]
    if role == "parameters":
        return [
            Hook(module, parameters_pre_hook, pre=True),
            Hook(module, parameters_hook, pre=False, always_call=True),
        ]
    if role == "done":
        return [Hook(module, done_hook, pre=False)]
    if role == "route":
        own = module.__dict__.get("forward", MISSING)
        module.forward = partial(routed, module, own)
        return [Restore(module, own)]
    raise AssertionError(role)


def acquire(roles: list[tuple[nn.Module, str]]) -> None:
    with LOCK:
        done = 0
        try:
            for key in roles:
                entry = HOOKED.get(key)
                if entry is None:
                    HOOKED[key] = [1, _register(*key)]
                else:
                    entry[0] += 1
                done += 1
        except BaseException:  # KeyboardInterrupt halfway: what was taken is given back
            release(roles[:done])
            raise


def release(roles: list[tuple[nn.Module, str]]) -> None:
    with LOCK:
        for key in reversed(roles):
            entry = HOOKED[key]
            entry[0] -= 1
            if entry[0] == 0:
                del HOOKED[key]
                for handle in reversed(entry[1]):
                    handle.remove()
