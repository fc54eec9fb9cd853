"""One injection (`Injection`): an adapter in a model for a block of code in one thread, and the backwards through
its outputs; `inject`, the public context manager. `apply` is this block around one call.

Exceptions, `BaseException`s too: torch runs `always_call` hooks after an `Exception` only, so the block's exit
unwinds what an interrupted forward pushed (`unwind.py`), a failed backward's leftovers are dropped at the next
push (the engine itself drops the modes a failing node entered), and a failed call releases its unfinished layer
records (`checkpoint.py`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from .. import _torch_private as private
from .._mixed import AdapterRows
from .._params import Params
from .._sites import resolve_sites, with_shared
from .._structure import check
from .._transform import in_transform
from .._variant import Schedule, Site
from ..kinds import form_of
from ..kinds.linear import is_linear_like, quantization
from ..variants import variant_for
from .compiled import SwappedHooks, enter_compiled, run_eager
from .detach import Detached, is_plain_parameter
from .dispatch import name_of
from .positions import call_masks
from .registry import acquire, release
from .state import LOCK, MISSING, per_thread, thread_state
from .unwind import reset_thread, unwind


class Injection:
    """One adapter in one model, for a block of code in one thread (and the backwards through its outputs)."""

    def __init__(self, model: nn.Module, params: Params, adapter_ids: Any, caller: str) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{caller}: `model` must be an nn.Module, got {type(model).__name__}")
        if not isinstance(params, Params):
            raise TypeError(
                f"{caller}: `params` must be lora_func Params (from lf.init or lf.load), got {type(params).__name__}"
            )
        variant = params.variant or variant_for(params.config, caller=caller)  # resolved when the Params was made
        # One pass over the model finds everything this call touches besides the targets.
        modules, self.layers, quantized, owners = survey(model)
        self.needs_detach = bool(owners)
        count = check(params, caller, model=model, modules=modules)  # the structure check, before anything runs
        self.rows: AdapterRows | None = None
        if adapter_ids is not None:
            if count is None:
                raise ValueError(
                    f"{caller}: `adapter_ids` picks among stacked adapters, but `params` holds a single adapter; "
                    "stack K adapters with lf.stack"
                )
            self.rows = AdapterRows(adapter_ids, count, caller)
        elif count is not None:
            raise ValueError(
                f"{caller}: `params` stacks {count} adapters (a leading dimension of {count} on every leaf); run "
                "them with torch.func.vmap(lambda p: lf.apply(model, p, batch))(params), or give `adapter_ids` "
                "to pick one adapter per batch row"
            )
        schedule = variant.capability(Schedule)
        if schedule is not None and schedule.guard is not None and count is None and torch.is_grad_enabled():
            schedule.guard(params, caller, model.training)  # training on without the schedule (AdaLoRA's allocator)
        self.model, self.params, self.caller = model, params, caller
        self.inputs: set[nn.Module] = set()  # the targets of the input form (`form_of`); the others: the output form
        self.bindings: dict[nn.Module, tuple[Callable, dict, Site, Callable | None]] = {}  # fn, leaves, site, inference
        self.parameter_bindings: dict[nn.Module, list[tuple[Callable, dict, Site]]] = {}  # `form_of`: "parameters"
        # First, so that on a target the mode is popped before the adapter's own ops run (they need none).
        roles: list[tuple[nn.Module, str]] = [(module, "detach") for module in owners]
        rows = self.rows
        self.positions = call_masks(variant, params, model, caller)  # ReFT: the model call's attention mask
        alone = rows is None and not torch.compiler.is_compiling()  # where a variant's `ParameterForm` may apply
        for module, site in resolve_sites(model, params, caller, modules):
            leaves = with_shared(params, site.target.path)
            target_form = form_of(variant, site.target, site if alone else None)
            if target_form.where == "parameters":
                if rows is not None:
                    raise ValueError(
                        f"{caller}: `adapter_ids` mixes adapters per row, but {site.target.path!r} "
                        f"({site.target.kind}) is injected by replacing its parameters, one set per call; run each "
                        "adapter on its own rows"
                    )
                self.parameter_bindings.setdefault(module, []).append((target_form.run, leaves, site))
                continue
            if target_form.where == "input":
                fn = target_form.run if rows is None else partial(rows.forward_input, target_form.run)
                self.inputs.add(module)
            else:
                fn = target_form.run if rows is None else partial(rows.forward, target_form.run)
                if self.positions is not None:
                    fn = partial(self.positions.forward, fn)
            inference = None if module in self.inputs or variant.inference is None else variant.inference(site, rows)
            self.bindings[module] = (fn, leaves, site, inference)
            roles.append((module, target_form.where))
        roles += [(module, "parameters") for module in self.parameter_bindings]
        self._detached: dict[int, torch.Tensor] | None = None
        self._mode: Detached | None = None
        self._held: list[torch.Tensor] = []  # parameters added to the table by `cover`
        # the model itself too: one injection per model and thread
        touched = [model, *self.bindings, *self.parameter_bindings, *owners]
        if self.positions is not None:
            roles.append((model, "positions"))
        if self.layers:
            roles.append((model, "done"))
        for layer in self.layers:
            roles.append((layer, "layer"))
            touched.append(layer)
        for module in quantized:
            roles.append((module, "route"))
            touched.append(module)
        self.roles = roles
        self.touched = list(dict.fromkeys(touched))
        self.leases = 0
        self.task = -1  # the graph task the block was entered in (-1: not inside a backward)
        self.thread: int | None = None
        self.exited = False
        self.registered = False
        self.compiled: list[SwappedHooks] | None = None
        self.eager = False  # whether this block holds compiled code to eager (`run_eager`)
        self.pending: list[weakref.ref] = []  # records of layer calls made by a model call that has not returned
        self.grad_at_enter = False
        self.saved_hooks: tuple | None = None  # the saved-tensor hooks the block was entered under
        self._table: dict | None = None  # the entering thread's table
        self._depths = (0, 0, 0)  # the entering thread's stacks, at entry

    # -- the block ---------------------------------------------------------------------------------------------
    def __enter__(self) -> Injection:
        if self.thread is not None:
            raise RuntimeError(f"{self.caller}: this injection was already entered; open a new lf.inject block")
        if torch.compiler.is_compiling():
            enter_compiled(self)
            return self
        if in_transform() and self.layers and self.model.training and torch.is_grad_enabled():
            raise RuntimeError(
                f"{self.caller}: gradient checkpointing is on, and torch.utils.checkpoint cannot run under "
                "torch.func transforms (grad, vmap, ...); call model.gradient_checkpointing_disable() for "
                "torch.func, or keep checkpointing and train with loss.backward()"
            )
        active = thread_state()
        clash = next((m for m in self.touched if m in active), None)
        if clash is not None:
            other = active[clash]
            raise RuntimeError(
                f"{self.caller}: this thread already runs {type(other.model).__name__} with an adapter "
                f"(an open {other.caller} touching {name_of(other.model, clash)!r}); one adapter per module at a time: "
                "stack adapters with lf.stack and `adapter_ids`, or close the other block first"
            )
        if not active:
            reset_thread()  # no block is open in this thread: what its stacks hold, an exception left
        self.thread = threading.get_ident()
        self.task = private.graph_task_id()
        self.grad_at_enter = torch.is_grad_enabled()
        self.saved_hooks = private.saved_tensors_hooks()
        self._table = active
        self._depths = (len(per_thread.modes), len(per_thread.replacing), len(per_thread.layers))
        try:
            acquire(self.roles)
            self.registered = True
            for module in self.touched:
                active[module] = self
            self.eager = run_eager(True)
        except BaseException:
            self._close(active, failed=True)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.compiled is not None:
            for swapped in reversed(self.compiled):
                swapped.remove()
            self.compiled = None
            return
        if threading.get_ident() != self.thread:
            # A generator holding the block, finished by another thread: close it all the same, then say so.
            self._close(self._table, failed=True)
            raise RuntimeError(
                f"{self.caller}: an lf.inject block must exit in the thread that entered it (a generator holding "
                "the block was finished by another thread); the adapter is removed, and what ran in the other "
                "thread ran without it"
            )
        unwind(self._depths)  # what an interrupted forward left: its modes, its layer calls
        self._close(per_thread.active, failed=exc[0] is not None)

    def _close(self, table: dict | None, failed: bool) -> None:
        """Leave the entering thread's table; when the block failed, release the records of its unfinished
        model call (nothing can differentiate an output that was never returned); unregister when done."""
        if table is not None:
            for module in self.touched:
                if table.get(module) is self:
                    del table[module]
        with LOCK:
            if self.eager:
                self.eager = run_eager(False)
            if failed:
                pending, self.pending = self.pending, []
                for ref in pending:
                    call = ref()
                    if call is not None:
                        call.lease.release()
            self.exited = True
            self.unregister_if_done()

    def unregister_if_done(self) -> None:
        with LOCK:
            if self.exited and self.leases == 0 and self.registered:
                self.registered = False
                release(self.roles)

    # -- helpers for the dispatchers ---------------------------------------------------------------------------
    def detaching_mode(self) -> Detached:
        """One mode per injection, entered by every module that owns base parameters requiring grad (the mode
        holds no state of its own: the same object may sit on several threads' stacks)."""
        if self._mode is None:
            self._mode = Detached(self.detached())
        return self._mode

    def cover(self, module: nn.Module) -> None:
        """Add the parameters `module` holds now to the detached table: FSDP2 puts unsharded parameters (other
        objects than the sharded ones the table was built from) on a module for its forward. Each is held until
        the injection is gone, so its id is not reused by another tensor meanwhile."""
        table = self.detached()
        for p in module._parameters.values():
            if p is not None and id(p) not in table and p.requires_grad and is_plain_parameter(p):
                table[id(p)] = p.detach()
                self._held.append(p)

    def detached(self) -> dict[int, torch.Tensor]:
        """{id(base parameter): its detached view} for the parameters that require grad."""
        if self._detached is None:
            self._detached = {
                id(p): p.detach() for p in self.model.parameters() if p.requires_grad and is_plain_parameter(p)
            }
        return self._detached

    def same_adapter(self, other: Injection) -> bool:
        if self is other:
            return True
        ours = [(p, leaf, t) for p, leaf, t in self.params.leaves()]
        theirs = [(p, leaf, t) for p, leaf, t in other.params.leaves()]
        same_rows = (None if self.rows is None else self.rows.ids) == (None if other.rows is None else other.rows.ids)
        return same_rows and len(ours) == len(theirs) and all(a[2] is b[2] for a, b in zip(ours, theirs))

    def refuse_compiled_model(self) -> None:
        raise RuntimeError(
            f"{self.caller}: torch.compile traces {type(self.model).__name__} inside an lf.{self.caller} block "
            "opened outside the compiled code; compiled code does not see the block's adapter (one layer's "
            "adapter for every layer, or none). Open the block inside the compiled function "
            "(torch.compile(lambda p, b: lf.apply(model, p, b))), or run the model eagerly in the block"
        )


def survey(model: nn.Module) -> tuple[dict[str, nn.Module], list[nn.Module], list[nn.Module], list[nn.Module]]:
    """One walk over the model (`apply` pays it on every call, so it reads the module dicts directly, never
    through `nn.Module.__getattr__`): {name: module} as `named_modules` gives it, the layers under HF gradient
    checkpointing, the bitsandbytes layers, and the modules that own a plain base parameter requiring grad."""
    modules: dict[str, nn.Module] = {}
    layers: list[nn.Module] = []
    quantized: list[nn.Module] = []
    owners: list[nn.Module] = []
    seen: set[int] = set()
    stack = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:  # a module registered twice keeps its first name, as in named_modules
            continue
        seen.add(id(module))
        modules[name] = module
        flag = module.__dict__.get("gradient_checkpointing", MISSING)
        if flag is MISSING:
            flag = getattr(type(module), "gradient_checkpointing", False)
        if flag is True:
            layers.append(module)
        own = module._parameters
        if own:
            if any(p is not None and p.requires_grad and is_plain_parameter(p) for p in own.values()):
                owners.append(module)
            weight = own.get("weight")
            # bnb weights are tensor subclasses; a bnb Linear4bit that FSDP2 sharded holds a DTensor (between
            # forwards) or FSDP2's gathered plain tensor (inside one) and keeps its quantization state on the layer
            packed = weight is not None and (not is_plain_parameter(weight) or "quant_state" in module.__dict__)
            if packed and is_linear_like(module) and quantization(module) is not None:
                quantized.append(module)
        prefix = name + "." if name else ""
        children = [(prefix + child_name, child) for child_name, child in module._modules.items() if child is not None]
        stack.extend(reversed(children))  # depth first, children in order: named_modules' order
    return modules, layers, quantized, owners


def inject(
    model: nn.Module,
    params: Params,
    *,
    adapter_ids: torch.Tensor | Sequence[int] | None = None,
) -> Injection:
    """A context manager: inside the block, in this thread, every forward of `model` runs with the adapter.

    Other threads, and code after the block, see the base model. `model.generate(...)`, an evaluation
    harness, several forwards and a custom loss all run with it; outputs computed inside the block can be
    differentiated after it exits, with or without HF gradient checkpointing (the adapter then stays
    registered, inert for every other call, until that backward has run). `adapter_ids` (with stacked
    params, `lf.stack`): row i of every batch uses adapter `adapter_ids[i]`, -1 the base model.

    >>> with lf.inject(model, params):
    ...     tokens = model.generate(**prompt, max_new_tokens=32)
    >>> with lf.inject(model, lf.stack([p0, p1]), adapter_ids=[0, 1, -1]):  # one adapter per row
    ...     tokens = model.generate(**three_prompts, max_new_tokens=32)

    One adapter per module per thread at a time: a second block on the same model inside the first is an
    error. Base parameters get no gradient, even when they require grad (the flags are left as they are);
    the model's parameters are never replaced.
    """
    return Injection(model, params, adapter_ids, "inject")
