"""`inject`: an adapter in a model for a block of code, in one thread. `apply` is this block around one call.

What lives where, and why:
- The model's hook dicts are shared by every thread; an adapter must not be. While any injection of a
  model is open, each touched module carries one lora_func dispatcher per role (reference-counted across
  injections, registered and removed under one lock). A dispatcher looks up what to do in *this thread's*
  table (`threading.local`): a plain call in another thread runs the same dispatcher, finds nothing, and
  computes the base model; two threads with two adapters each find their own.
- Nothing of the model is replaced, not even for a moment: no parameter swap (`functional_call` puts
  tensors into the shared module, where every thread sees them). Base parameters that require grad (a
  freshly loaded HF model) are kept out of the graph by a thread-local `TorchFunctionMode` that hands each
  op a detached view of them, pushed around the forward (with grad on) of each module that owns such a
  parameter: only those modules' own ops pay for the mode (a Python call per op), not attention, residuals or
  the adapter's ops, which are most of a launch-bound step's ops. A part of the model called directly is covered
  the same way. A module that reads another module's parameter in its own forward is covered when it owns one
  itself (`nn.MultiheadAttention` reads its `out_proj.weight`); one that owns none and reads a descendant's
  parameter directly is not.
- Lifetime follows the autograd graph, not the output's Python object. Without gradient checkpointing
  nothing is needed after the block: the graph holds what backward needs. With HF gradient checkpointing,
  backward re-runs each checkpointed layer, after the block (or `apply`) has returned. Each injected call of
  a checkpointed layer is recorded (`_LayerCall`: the injection and the autograd sequence numbers its nodes
  got) and held by a pre-hook on the layer output's autograd node, so the record lives exactly as long as
  that part of the graph. When a backward reaches the layer, the record is entered for that graph task; the
  recompute, which runs inside one of the layer's own nodes, finds its record by that node's sequence
  number. That is exact whatever else the same backward runs: outputs of other adapters, of the base model,
  of other threads. The dispatchers stay registered (inert for everyone else) until the block has exited
  and every record has been consumed by a backward that did not retain the graph, or freed with the graph.
- Targets injected by parameters (`lora_func/kinds/`, `form_of`: fused MoE experts, `modules_to_save` copies):
  for the module's forward, in this thread, a `TorchFunctionMode` hands its ops the replacement tensors (W + ΔW,
  the copies) in place of those parameters, the way base parameters are handed out detached; the module's
  parameters themselves stay as they are.
- bitsandbytes layers under torch.func transforms and in mixed batches run through `QuantizedLinear`
  (lora_func/kinds/linear.py): bnb's autograd.Functions refuse torch.func and its kernels have no vmap rule. The
  layer's `forward` attribute is a dispatcher while an injection is open; other threads get bnb's own.
- Under torch.compile the hooks are closures of the one call, swapped into the hook dicts
  (`_SwappedHooks`: `register_forward_hook` graph-breaks); backward is compiled ahead, nothing recomputes.
  Code compiled outside the block ignores hooks added after it compiled (dynamo does not guard on them): while an
  eager block is open, compiled code runs eagerly (`_run_eager`), and the dispatchers refuse to be traced.
- Exceptions, `BaseException`s too: torch runs `always_call` hooks after an `Exception` only, so the block's exit
  unwinds what an interrupted forward pushed, a failed backward's leftovers are dropped at the next push (the
  engine itself drops the modes a failing node entered), and a failed call releases its unfinished layer records.
- A copy of the model (`copy.deepcopy`, `torch.save`) holds inert `_Orphan`s where the original holds dispatchers.
- `torch.utils.checkpoint` that lora_func did not set up (the model's own, or HF checkpointing switched on inside
  the block) is refused at the forward (`_refuse_unseen_checkpoint`): its recompute would not see the adapter.
- Private torch names: through `_torch_private` only.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import _torch_private as private
from ._mixed import AdapterRows
from ._params import Params
from ._sites import resolve_sites, with_shared
from ._structure import check
from ._transform import in_transform
from ._variant import Site
from .kinds import form_of
from .kinds.linear import QuantizedLinear, is_linear_like, quantization
from .variants import variant_for

_LOCK = threading.RLock()  # guards hook registration, reference counts and the records of running backwards
_local = threading.local()  # .active: {module: Injection} for this thread; .layers, .modes: stacks
_HOOKED: dict[tuple[nn.Module, str], list] = {}  # (module, role) -> [count, handles]
_ENTERED: dict[int, tuple[bool, list]] = {}  # graph task -> (keep_graph, weakrefs to the layer calls it reached)
_MISSING = object()
_EAGER: list = [0, None]  # eager blocks open in the process, and the compile stance they found (see `_run_eager`)

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed
    DTensor = ()  # isinstance(x, ()) is always False

_graph_task = private.graph_task_id
_sequence_nr = private.sequence_nr


def _active() -> dict:
    active = getattr(_local, "active", None)
    if active is None:
        active = _local.active = {}
        _local.layers = []  # (layer, injection, first sequence number) of the checkpointed layers running
        _local.modes = []  # (module, detaching mode or None, function-mode depth before it) of the modules running
        _local.detaching = 0  # how many of those modes are entered
        _local.replacing = []  # (module, replacing mode or None, depth) of the parameter-form modules running
    return active


def _is_plain_parameter(p: torch.Tensor) -> bool:
    """A parameter whose `detach()` keeps what it is: plain tensors, and DTensors (FSDP2's sharded
    parameters). Not bnb weights: tensor subclasses whose detach() drops their quantization state."""
    return type(p) is nn.Parameter or type(p) is torch.Tensor or isinstance(p, DTensor)


# -- the base parameters, detached ------------------------------------------------------------------------------


class _Detached(TorchFunctionMode):
    """Every op of this thread gets a detached view in place of the base parameters in `table` (by id)."""

    def __init__(self, table: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.table = table

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Called for every op of the module's forward: inlined, no call per argument.
        get = self.table.get
        args = [_swap(a, get) if type(a) in _SEQUENCES else get(id(a), a) for a in args]
        if kwargs:
            kwargs = {k: _swap(v, get) if type(v) in _SEQUENCES else get(id(v), v) for k, v in kwargs.items()}
            return func(*args, **kwargs)
        return func(*args)


_SEQUENCES = (list, tuple)  # torch.cat([w1, w2]), foreach ops


def _swap(value: list | tuple, get: Callable) -> list | tuple:
    return type(value)(get(id(v), v) for v in value)


def _push_detached(module: nn.Module, injection: Injection | None) -> None:
    """Enter the injection's detaching mode in this thread for `module`'s forward (or note that none was)."""
    _active()
    modes = _local.modes
    if modes:
        _heal(modes)
    depth = private.function_mode_depth()
    if injection is None or not injection.needs_detach or not torch.is_grad_enabled() or _local.detaching:
        modes.append((module, None, depth))
        return
    mode = injection.detaching_mode()
    injection.cover(module)
    mode.__enter__()
    _local.detaching += 1
    modes.append((module, mode, depth))


def _pop_detached(module: nn.Module) -> None:
    modes = getattr(_local, "modes", None)
    if not modes or modes[-1][0] is not module:  # a hook registered while this forward ran: nothing was pushed
        return
    _, mode, _ = modes.pop()
    if mode is not None:
        _local.detaching -= 1
        mode.__exit__(None, None, None)


# -- what an exception leaves on the thread ---------------------------------------------------------------------
# The modes above are pushed by a pre-hook and popped by an `always_call` forward hook, which torch runs for an
# `Exception` but not for a `BaseException` (KeyboardInterrupt, SystemExit, GeneratorExit). Two boundaries
# catch what such an exception leaves: the block's `__exit__` unwinds what was pushed since its `__enter__`;
# and in a backward, where the autograd engine itself drops the modes a failing node entered, the next push
# (or the next block) drops the entries whose mode is no longer on the thread's stack.


def _stale(entry: tuple) -> bool:
    _, mode, depth = entry
    if mode is None:
        return private.function_mode_depth() < depth
    return private.function_mode_depth() <= depth or private.function_mode_at(depth) is not mode


def _heal(stack: list) -> None:
    """Drop the entries on top of `stack` (`_local.modes` or `_local.replacing`) whose mode torch has dropped."""
    while stack and _stale(stack[-1]):
        _, mode, _ = stack.pop()
        if mode is not None and stack is _local.modes:
            _local.detaching -= 1


def _unwind(depths: tuple[int, int, int]) -> None:
    """Exit the modes this thread pushed since `depths` (of modes, replacing, layers) and drop their entries."""
    modes, replacing, layers = _local.modes, _local.replacing, _local.layers
    left = [(entry, modes) for entry in modes[depths[0] :]] + [(entry, replacing) for entry in replacing[depths[1] :]]
    del modes[depths[0] :], replacing[depths[1] :], layers[depths[2] :]
    for (_, mode, depth), stack in sorted(left, key=lambda item: item[0][2], reverse=True):
        if mode is None:
            continue
        if stack is modes:
            _local.detaching -= 1
        top = private.function_mode_depth() - 1
        if top == depth and private.function_mode_at(top) is mode:
            mode.__exit__(None, None, None)


def _reset_thread() -> None:
    """No injection is open in this thread: whatever its stacks hold was left by an exception (a plain call of a
    model with dispatchers pushes entries without a mode; those are dropped too, harmlessly)."""
    _unwind((0, 0, 0))
    _local.detaching = 0
    _drop_failed_tasks()


# -- dispatchers: one per (module, role), shared by every injection and thread ----------------------------------


def _here(module: nn.Module, task: int) -> Injection | None:
    """The injection this module's forward belongs to: this thread's; in a backward, the recomputed layer's.

    In a backward (`task` != -1) a forward is a recompute. Of an injected call of an HF checkpointed layer:
    its record says which injection (`_recompute_call`). Of anything else, this thread's injection applies
    only if it was opened inside this very backward (a user's own checkpoint around `lf.apply`); a block
    opened before the backward does not claim recomputes of calls made outside it (base-model outputs).
    """
    if task != -1:
        call = _recompute_call(task)
        if call is not None:
            return call.injection
    active = getattr(_local, "active", None)
    injection = active.get(module) if active else None
    if injection is None or injection.task != task:
        return None
    if torch.compiler.is_compiling():
        injection.refuse_compiled_model()
    return injection


def _output_hook(module, args, *rest):  # rest: (kwargs, output), or (output,) when registered as removal races
    task = _graph_task()
    injection = _here(module, task)
    if injection is None:
        return None
    binding = injection.bindings.get(module)
    if binding is None or injection.input_form:  # another thread's adapter of the input form shares the module
        return None
    fn, leaves, site, inference = binding
    x = args[0] if args else next(iter(rest[0].values()))
    if task == -1:
        _refuse_unseen_checkpoint(injection, module)
    if inference is not None and not module.training and not torch.is_grad_enabled():
        y = inference(x, rest[-1], leaves)
        if y is not None:
            return y
    return fn(x, rest[-1], leaves, site)


def _input_hook(module, args, *rest):  # rest: (kwargs,), or () when registered as removal races
    task = _graph_task()
    injection = _here(module, task)
    if injection is None:
        return None
    binding = injection.bindings.get(module)
    if binding is None or not injection.input_form:  # another thread's adapter of the output form shares it
        return None
    if task == -1:
        _refuse_unseen_checkpoint(injection, module)
    fn, leaves, site, _ = binding
    if args:
        new_args = (fn(args[0], leaves, site), *args[1:])
        return (new_args, rest[0]) if rest else new_args
    kwargs = rest[0]
    key = next(iter(kwargs))
    return args, {**kwargs, key: fn(kwargs[key], leaves, site)}


def _refuse_unseen_checkpoint(injection: Injection, module: nn.Module) -> None:
    """A target running inside `torch.utils.checkpoint` that no recorded HF layer set up (the model's own call,
    or HF checkpointing switched on inside the block) would be recomputed in backward without the adapter:
    reentrant checkpointing then gives no adapter gradient, silently, and non-reentrant fails inside torch."""
    if _local.layers or torch.compiler.is_compiling():  # an HF checkpointed layer recorded; compiled: `_here`
        return
    if torch.is_grad_enabled():  # non-reentrant: the checkpoint's saved-tensor hooks, opened inside the block
        hooks = private.saved_tensors_hooks()
        if hooks is None or hooks == injection.saved_hooks or not private.is_checkpoint_hooks(hooks):
            return
    elif not (injection.grad_at_enter and module.training and _checkpoint_running()):  # reentrant: runs no_grad
        return
    raise RuntimeError(
        f"{injection.caller}: {_name(injection.model, module)!r} runs inside torch.utils.checkpoint that "
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


def _parameters_pre_hook(module, args, *rest):
    """A module injected by parameters (fused experts, a saved copy): for its forward, in this thread, its ops see
    the replacement tensors in place of those parameters (computed per call, so a recompute computes them again)."""
    task = _graph_task()
    injection = _here(module, task)
    bindings = None if injection is None else injection.parameter_bindings.get(module)
    _active()
    replacing = _local.replacing
    if replacing:
        _heal(replacing)
    depth = private.function_mode_depth()
    if not bindings:
        replacing.append((module, None, depth))
        return
    if task == -1:
        _refuse_unseen_checkpoint(injection, module)
    # The parameter and its detached view (a detaching mode of a recompute may be entered after this one).
    detached = injection.detached() if injection.needs_detach else {}
    table = {}
    for fn, leaves, site in bindings:
        for name, tensor in fn(leaves, site).items():
            param = module._parameters[name]
            table[id(param)] = tensor
            if id(param) in detached:
                table[id(detached[id(param)])] = tensor
    mode = _Detached(table)
    mode.__enter__()
    replacing.append((module, mode, depth))


def _parameters_hook(module, args, *rest):
    replacing = getattr(_local, "replacing", None)
    if not replacing or replacing[-1][0] is not module:  # registered while this forward ran: nothing was pushed
        return
    _, mode, _ = replacing.pop()
    if mode is not None:
        mode.__exit__(None, None, None)


def _detach_pre_hook(module, args, *rest):
    """A module that owns base parameters requiring grad: its ops see them detached, in an injected forward
    with grad on and in the recompute of an injected call of a checkpointed layer."""
    _push_detached(module, _here(module, _graph_task()))


def _detach_hook(module, args, *rest):
    _pop_detached(module)


def _layer_pre_hook(module, args, *rest):
    """A checkpointed layer, in an injected forward that will checkpoint: note where its autograd nodes
    start, and give reentrant checkpointing an input that requires grad (docs/internals.md)."""
    active = getattr(_local, "active", None)
    injection = active.get(module) if active else None
    if injection is None or _graph_task() != -1 or not module.gradient_checkpointing:
        return None
    if not (module.training and torch.is_grad_enabled()):
        return None
    _local.layers.append((module, injection, _sequence_nr()))
    if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return None
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            new_args = (*args[:i], a.detach().requires_grad_(), *args[i + 1 :])
            return (new_args, rest[0]) if rest else new_args
    return None


def _layer_hook(module, args, *rest):
    layers = getattr(_local, "layers", None)
    if not layers or layers[-1][0] is not module:
        return None
    _, injection, start = layers.pop()
    output = rest[-1]
    leaves = private.pytree.tree_leaves(output)
    nodes = {t.grad_fn for t in leaves if isinstance(t, torch.Tensor) and t.grad_fn is not None}
    if nodes:
        call = _LayerCall(injection, start, _sequence_nr())
        for node in nodes:
            node.register_prehook(partial(_entered, call))
        injection.pending.append(weakref.ref(call))
    return None


def _done_hook(module, args, *rest):
    """The model's call returned (not `always_call`): its layer calls' records belong to an output now."""
    injection = _here(module, _graph_task())
    if injection is not None:
        injection.pending.clear()


def _routed(module: nn.Module, own: Any, *args, **kwargs):
    """A bnb layer's forward while an injection is open: `QuantizedLinear` where this call needs it."""
    injection = _here(module, _graph_task())
    if injection is not None and (injection.rows is not None or in_transform()):
        return QuantizedLinear.apply(args[0], module)
    if own is _MISSING:
        return type(module).forward(module, *args, **kwargs)
    return own(*args, **kwargs)


class _Restore:
    """Puts back a module's own instance-level `forward` (or its absence)."""

    def __init__(self, module: nn.Module, own: Any) -> None:
        self.module, self.own = module, own

    def remove(self) -> None:
        if self.own is _MISSING:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.own


class _Hook:
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
        hooks[key] = _Dispatcher(hook)
        self.dicts, self.key = (hooks, *flags), key

    def remove(self) -> None:
        for d in self.dicts:
            d.pop(self.key, None)


class _Dispatcher(partial):
    """A dispatcher as the module's hook dicts hold it: the hook itself (a `partial` calls it at C speed), but a
    copy of the module (`copy.deepcopy`, `torch.save`/`torch.load` of the whole model: EMA, teacher and reference
    models) gets an `_Orphan` instead, which removes itself from the copy on its first call."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict) -> _Orphan:
        return _Orphan()

    def __reduce__(self):
        return (_Orphan, ())


class _Orphan:
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
        return [_Hook(module, _output_hook, pre=False)]
    if role == "input":
        return [_Hook(module, _input_hook, pre=True)]
    if role == "layer":
        return [_Hook(module, _layer_pre_hook, pre=True), _Hook(module, _layer_hook, pre=False, always_call=True)]
    if role == "detach":
        return [_Hook(module, _detach_pre_hook, pre=True), _Hook(module, _detach_hook, pre=False, always_call=True)]
    if role == "parameters":
        return [
            _Hook(module, _parameters_pre_hook, pre=True),
            _Hook(module, _parameters_hook, pre=False, always_call=True),
        ]
    if role == "done":
        return [_Hook(module, _done_hook, pre=False)]
    if role == "route":
        own = module.__dict__.get("forward", _MISSING)
        module.forward = partial(_routed, module, own)
        return [_Restore(module, own)]
    raise AssertionError(role)


def _acquire(roles: list[tuple[nn.Module, str]]) -> None:
    with _LOCK:
        done = 0
        try:
            for key in roles:
                entry = _HOOKED.get(key)
                if entry is None:
                    _HOOKED[key] = [1, _register(*key)]
                else:
                    entry[0] += 1
                done += 1
        except BaseException:  # KeyboardInterrupt halfway: what was taken is given back
            _release(roles[:done])
            raise


def _release(roles: list[tuple[nn.Module, str]]) -> None:
    with _LOCK:
        for key in reversed(roles):
            entry = _HOOKED[key]
            entry[0] -= 1
            if entry[0] == 0:
                del _HOOKED[key]
                for handle in reversed(entry[1]):
                    handle.remove()


# -- checkpointed layers: records that live with the graph -----------------------------------------------------


class _Lease:
    """Keeps an injection's dispatchers registered; released once (by a backward, or with the graph)."""

    __slots__ = ("injection",)

    def __init__(self, injection: Injection) -> None:
        self.injection = injection
        with _LOCK:
            injection.leases += 1

    def release(self) -> None:
        with _LOCK:
            injection, self.injection = self.injection, None
            if injection is not None:
                injection.leases -= 1
                injection.unregister_if_done()


class _LayerCall:
    """One injected call of a checkpointed layer: its autograd nodes have sequence numbers in [start, stop)."""

    __slots__ = ("injection", "start", "stop", "lease", "__weakref__")

    def __init__(self, injection: Injection, start: int, stop: int) -> None:
        self.injection, self.start, self.stop = injection, start, stop
        self.lease = _Lease(injection)
        weakref.finalize(self, self.lease.release)


def _entered(call: _LayerCall, grad_outputs):
    """A backward reached the layer's output: its recompute belongs to `call` (see `_recompute_call`).

    The graph task's list holds weak references: if that backward fails before its end-of-task callback
    runs, the records still die with their graph (and release their leases)."""
    task = _graph_task()
    with _LOCK:
        entry = _ENTERED.get(task)
        if entry is None:
            _drop_failed_tasks()
            entry = _ENTERED[task] = (private.graph_task_keep_graph(), [])
            private.queue_engine_callback(partial(_task_done, task))
        if not any(r() is call for r in entry[1]):
            entry[1].append(weakref.ref(call))
    return None


def _drop_failed_tasks() -> None:
    """Forget the backwards that ended in an error (no end-of-task callback) and whose records are gone."""
    with _LOCK:
        for stale in [t for t, (_, refs) in _ENTERED.items() if all(r() is None for r in refs)]:
            del _ENTERED[stale]


def _task_done(task: int) -> None:
    with _LOCK:
        keep, refs = _ENTERED.pop(task, (True, []))
    if not keep:  # the graph's buffers are freed: no later backward recomputes these layers
        for ref in refs:
            call = ref()
            if call is not None:
                call.lease.release()


def _recompute_call(task: int) -> _LayerCall | None:
    """In backward: the injected layer call whose node is running (None: not a recompute of an injected call)."""
    entry = _ENTERED.get(task)
    if entry is None:
        return None
    node = private.current_autograd_node()
    if node is None:
        return None
    seq = private.node_sequence_nr(node)
    found = None
    for ref in entry[1]:
        call = ref()
        if call is not None and call.start <= seq < call.stop:
            if found is not None and not found.injection.same_adapter(call.injection):
                raise RuntimeError(
                    f"{call.injection.caller}: a backward recomputes a checkpointed layer that two injected calls "
                    "from different threads could own (their autograd sequence numbers overlap); call backward on "
                    "each thread's outputs separately"
                )
            found = call
    return found


# -- one injection ----------------------------------------------------------------------------------------------


class Injection:
    """One adapter in one model, for a block of code in one thread (and the backwards through its outputs)."""

    def __init__(self, model: nn.Module, params: Params, adapter_ids: Any, caller: str) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{caller}: `model` must be an nn.Module, got {type(model).__name__}")
        if not isinstance(params, Params):
            raise TypeError(
                f"{caller}: `params` must be lora_func Params (from lf.init or lf.load), got {type(params).__name__}"
            )
        variant = variant_for(params.config, caller=caller)
        # One pass over the model finds everything this call touches besides the targets.
        modules, self.layers, quantized, owners = _survey(model)
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
        self.model, self.params, self.caller = model, params, caller
        self.input_form = variant.forward_input is not None
        self.bindings: dict[nn.Module, tuple[Callable, dict, Site, Callable | None]] = {}  # fn, leaves, site, inference
        self.parameter_bindings: dict[nn.Module, list[tuple[Callable, dict, Site]]] = {}  # `form_of`: "parameters"
        form = "input" if self.input_form else "output"
        # First, so that on a target the mode is popped before the adapter's own ops run (they need none).
        roles: list[tuple[nn.Module, str]] = [(module, "detach") for module in owners]
        rows = self.rows
        for module, site in resolve_sites(model, params, caller, modules):
            leaves = with_shared(params, site.target.path)
            target_form = form_of(variant, site.target)
            if target_form.where == "parameters":
                if rows is not None:
                    raise ValueError(
                        f"{caller}: `adapter_ids` mixes adapters per row, but {site.target.path!r} "
                        f"({site.target.kind}) is injected by replacing its parameters, one set per call; run each "
                        "adapter on its own rows"
                    )
                self.parameter_bindings.setdefault(module, []).append((target_form.run, leaves, site))
                continue
            if self.input_form:
                fn = variant.forward_input if rows is None else partial(rows.forward_input, variant.forward_input)
            else:
                fn = variant.forward if rows is None else partial(rows.forward, variant.forward)
            inference = None if self.input_form or variant.inference is None else variant.inference(site, rows)
            self.bindings[module] = (fn, leaves, site, inference)
            roles.append((module, form))
        roles += [(module, "parameters") for module in self.parameter_bindings]
        self._detached: dict[int, torch.Tensor] | None = None
        self._mode: _Detached | None = None
        self._held: list[torch.Tensor] = []  # parameters added to the table by `cover`
        # the model itself too: one injection per model and thread
        touched = [model, *self.bindings, *self.parameter_bindings, *owners]
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
        self.compiled: list[_SwappedHooks] | None = None
        self.eager = False  # whether this block holds compiled code to eager (`_run_eager`)
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
            self._enter_compiled()
            return self
        if in_transform() and self.layers and self.model.training and torch.is_grad_enabled():
            raise RuntimeError(
                f"{self.caller}: gradient checkpointing is on, and torch.utils.checkpoint cannot run under "
                "torch.func transforms (grad, vmap, ...); call model.gradient_checkpointing_disable() for "
                "torch.func, or keep checkpointing and train with loss.backward()"
            )
        active = _active()
        clash = next((m for m in self.touched if m in active), None)
        if clash is not None:
            other = active[clash]
            raise RuntimeError(
                f"{self.caller}: this thread already runs {type(other.model).__name__} with an adapter "
                f"(an open {other.caller} touching {_name(other.model, clash)!r}); one adapter per module at a time: "
                "stack adapters with lf.stack and `adapter_ids`, or close the other block first"
            )
        if not active:
            _reset_thread()  # no block is open in this thread: what its stacks hold, an exception left
        self.thread = threading.get_ident()
        self.task = _graph_task()
        self.grad_at_enter = torch.is_grad_enabled()
        self.saved_hooks = private.saved_tensors_hooks()
        self._table = active
        self._depths = (len(_local.modes), len(_local.replacing), len(_local.layers))
        try:
            _acquire(self.roles)
            self.registered = True
            for module in self.touched:
                active[module] = self
            self.eager = _run_eager(True)
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
        _unwind(self._depths)  # what an interrupted forward left: its modes, its layer calls
        self._close(_local.active, failed=exc[0] is not None)

    def _close(self, table: dict | None, failed: bool) -> None:
        """Leave the entering thread's table; when the block failed, release the records of its unfinished
        model call (nothing can differentiate an output that was never returned); unregister when done."""
        if table is not None:
            for module in self.touched:
                if table.get(module) is self:
                    del table[module]
        with _LOCK:
            if self.eager:
                self.eager = _run_eager(False)
            if failed:
                pending, self.pending = self.pending, []
                for ref in pending:
                    call = ref()
                    if call is not None:
                        call.lease.release()
            self.exited = True
            self.unregister_if_done()

    def unregister_if_done(self) -> None:
        with _LOCK:
            if self.exited and self.leases == 0 and self.registered:
                self.registered = False
                _release(self.roles)

    # -- helpers for the dispatchers ---------------------------------------------------------------------------
    def detaching_mode(self) -> _Detached:
        """One mode per injection, entered by every module that owns base parameters requiring grad (the mode
        holds no state of its own: the same object may sit on several threads' stacks)."""
        if self._mode is None:
            self._mode = _Detached(self.detached())
        return self._mode

    def cover(self, module: nn.Module) -> None:
        """Add the parameters `module` holds now to the detached table: FSDP2 puts unsharded parameters (other
        objects than the sharded ones the table was built from) on a module for its forward. Each is held until
        the injection is gone, so its id is not reused by another tensor meanwhile."""
        table = self.detached()
        for p in module._parameters.values():
            if p is not None and id(p) not in table and p.requires_grad and _is_plain_parameter(p):
                table[id(p)] = p.detach()
                self._held.append(p)

    def detached(self) -> dict[int, torch.Tensor]:
        """{id(base parameter): its detached view} for the parameters that require grad."""
        if self._detached is None:
            self._detached = {
                id(p): p.detach() for p in self.model.parameters() if p.requires_grad and _is_plain_parameter(p)
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

    # -- torch.compile -----------------------------------------------------------------------------------------
    def _enter_compiled(self) -> None:
        if self.needs_detach and torch.is_grad_enabled() and self.caller != "apply":
            raise RuntimeError(
                f"{self.caller}: under torch.compile, lf.inject cannot keep gradients out of base parameters that "
                "require grad; freeze the base (model.requires_grad_(False)) or call lf.apply inside the compiled code"
            )
        if self.parameter_bindings:
            raise RuntimeError(
                f"{self.caller}: under torch.compile, targets injected by replacing parameters (fused experts, "
                "`modules_to_save`) are not supported; run them eagerly"
            )
        self.thread = 0  # entered (dynamo cannot trace threading.get_ident)
        self.compiled = []
        for module, (fn, leaves, site, _) in self.bindings.items():
            if self.input_form:

                def pre_hook(mod, args, kwargs, fn=fn, leaves=leaves, site=site):
                    if args:
                        return (fn(args[0], leaves, site), *args[1:]), kwargs
                    key = next(iter(kwargs))
                    return args, {**kwargs, key: fn(kwargs[key], leaves, site)}

                self.compiled.append(_SwappedHooks(module, pre_hook, pre=True))
            else:

                def hook(mod, args, kwargs, output, fn=fn, leaves=leaves, site=site):
                    x = args[0] if args else next(iter(kwargs.values()))
                    return fn(x, output, leaves, site)

                self.compiled.append(_SwappedHooks(module, hook, pre=False))


def _run_eager(enter: bool) -> bool:
    """While an eager block is open, compiled code runs eagerly (`torch.compiler.set_stance("force_eager")`), in
    every thread: a model compiled before the block would otherwise run its compiled code, which ignores hooks
    added after it compiled (dynamo does not guard on them), and give the base model's outputs in silence. Blocks
    are counted; the last to close puts back the stance the first found. Returns whether this block holds it."""
    with _LOCK:
        if enter:
            current = private.compile_stance()
            if current is None:  # dynamo never imported: nothing compiled
                return False
            if _EAGER[0] == 0:
                if not private.set_compile_stance(private.eager_stance(current)):
                    return False  # inside compiled code (a graph break): torch keeps its stance
                _EAGER[1] = current
            _EAGER[0] += 1
            return True
        _EAGER[0] -= 1
        if _EAGER[0] == 0:
            private.set_compile_stance(_EAGER[1])
            _EAGER[1] = None
        return False


def _survey(model: nn.Module) -> tuple[dict[str, nn.Module], list[nn.Module], list[nn.Module], list[nn.Module]]:
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
        flag = module.__dict__.get("gradient_checkpointing", _MISSING)
        if flag is _MISSING:
            flag = getattr(type(module), "gradient_checkpointing", False)
        if flag is True:
            layers.append(module)
        own = module._parameters
        if own:
            if any(p is not None and p.requires_grad and _is_plain_parameter(p) for p in own.values()):
                owners.append(module)
            weight = own.get("weight")
            if weight is not None and not _is_plain_parameter(weight) and is_linear_like(module):
                if quantization(module) is not None:
                    quantized.append(module)
        prefix = name + "." if name else ""
        children = [(prefix + child_name, child) for child_name, child in module._modules.items() if child is not None]
        stack.extend(reversed(children))  # depth first, children in order: named_modules' order
    return modules, layers, quantized, owners


def _name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name or "<root>"
    return type(module).__name__


class _SwappedHooks:
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
