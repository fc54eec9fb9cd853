"""`apply`: run a model with an adapter injected for one call.

Mechanics, and why:
- Each target gets a forward hook (or pre-hook, for variants that transform the input) that computes
  the variant's pure forward from the call's tensors. The hooks are registered for the call only.
- Base parameters that require grad (a freshly loaded HF model) are passed detached through
  `torch.func.functional_call`, so backward never computes a base weight-gradient and the flags are
  left as they are.
- Gradient checkpointing recomputes layers during `backward()`, after `apply` has returned. So when
  the output can be differentiated, the hooks stay registered but inert until the backward through
  that output ends: a hook on each output tensor records the backward's graph-task id, the target
  hooks fire only inside that task (a plain model call in between sees the base model), and an
  end-of-backward callback removes everything. Layers recomputed in that backward also get their
  trainable base parameters detached, the recompute's counterpart of the functional_call above.
  If the output is never differentiated, everything is removed when the output is garbage-collected.
- HF reentrant checkpointing needs an input that requires grad; a pre-hook on each checkpointed
  layer supplies one for the duration of the forward.
- Stacked params (`lf.stack`, a leading K on every leaf, told apart from one adapter by the leaves'
  rank against the variant's `shapes`) run under `torch.func.vmap`, where `apply` sees one adapter,
  or row by row with `adapter_ids` (lora_func/_mixed.py); anything else is an error.
- Under torch.func transforms, and for mixed batches (which vmap the variant), bnb layers run through
  `QuantizedLinear` (lora_func/kinds/linear.py): bnb's own autograd.Functions refuse torch.func and its
  kernels have no vmap rule.
- Targets injected by parameters (`lora_func/kinds/`, `form_of`: fused experts, `modules_to_save` copies) get
  their replacement tensors through the same functional_call overrides, computed once per call, and put in
  again by the recompute hooks under gradient checkpointing.
- Under torch.compile everything closes when the forward returns (backward is AOT-compiled, nothing
  recomputes after), and the hooks go in by swapping the modules' hook dicts (`_SwappedHooks`), since
  `register_forward_hook` graph-breaks: one graph, and new adapter values of the same shapes reuse it.
  HF gradient checkpointing under compile is not covered (its input-grad pre-hooks graph-break).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.autograd import Variable

from ._mixed import AdapterRows
from ._params import SHARED, Params
from ._stack import stack_size
from ._variant import Site, Variant
from .kinds import form_of, site_for
from .kinds.linear import QuantizedLinear, is_linear_like, quantization
from .variants import variant_for

# Injections whose output awaits backward, per model: used to refuse ambiguous recomputes.
_PENDING: weakref.WeakKeyDictionary[nn.Module, set] = weakref.WeakKeyDictionary()
_MISSING = object()


def call_model(model: nn.Module, batch: Any, overrides: Mapping[str, torch.Tensor] | None = None) -> Any:
    """`model(**batch)` for a Mapping, `model(*batch)` for a tuple/list, else `model(batch)`."""
    if isinstance(batch, Mapping):
        args, kwargs = (), dict(batch)
    elif isinstance(batch, (tuple, list)):
        args, kwargs = tuple(batch), {}
    else:
        args, kwargs = (batch,), {}
    if overrides:
        return torch.func.functional_call(model, dict(overrides), args, kwargs)
    return model(*args, **kwargs)


try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed
    DTensor = ()  # isinstance(x, ()) is always False


def _is_plain_parameter(p: torch.Tensor) -> bool:
    """A parameter whose `detach()` keeps what it is: plain tensors, and DTensors (FSDP2's sharded
    parameters). Not bnb weights: tensor subclasses whose detach() drops their quantization state."""
    return type(p) is nn.Parameter or type(p) is torch.Tensor or isinstance(p, DTensor)


def _trainable_base(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base parameters that require grad, detached (the functional_call overrides)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad and _is_plain_parameter(p)}


def _checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """Modules that will checkpoint in this call (HF's `gradient_checkpointing` flag, training, grad on)."""
    if not (model.training and torch.is_grad_enabled()):
        return []
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


def _in_transform() -> bool:
    """Inside torch.func (grad/vmap/...) or torch.compile tracing, where backward runs inside the transform."""
    return torch._C._functorch.peek_interpreter_stack() is not None or torch.compiler.is_compiling()


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
        names = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs") if pre else _FORWARD_HOOK_DICTS
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


_FORWARD_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs")


class Injection:
    """The hooks that put one adapter into one model, for one call and (if needed) its backward."""

    def __init__(self, model: nn.Module, caller: str) -> None:
        self.model = model
        self.caller = caller
        self.running = False  # inside the forward of this call
        self.tasks: set[int] = set()  # graph tasks of backwards through this call's output
        self.handles: list[Any] = []
        self.swapped: dict[nn.Module, dict[str, nn.Parameter]] = {}
        self.replaced: dict[nn.Module, dict[str, torch.Tensor]] = {}  # parameter-form targets: name -> tensor
        self.patched: dict[nn.Module, Any] = {}  # module -> its own instance-level `forward`, if any
        self.open_outputs = 0
        self.pending = False  # registered in _PENDING (awaiting a backward)
        self.closed = False

    # -- when hooks act -------------------------------------------------------------------------
    def live(self) -> bool:
        if self.running:
            return True
        if not self.tasks:
            return False
        task = torch._C._current_graph_task_id()
        if task not in self.tasks:
            return False
        rivals = [i for i in _PENDING.get(self.model, ()) if i is not self and task in i.tasks]
        if rivals:
            raise RuntimeError(
                f"{self.caller}: one backward runs through {len(rivals) + 1} lf.apply outputs of the same model "
                "while gradient checkpointing recomputes its layers, so the recompute cannot tell which "
                "adapter it belongs to; call backward on each output separately, or turn checkpointing off"
            )
        return True

    # -- hooks ----------------------------------------------------------------------------------
    def add_target(
        self, module: nn.Module, variant: Variant, leaves: dict, site: Site, rows: AdapterRows | None = None
    ) -> None:
        """Hook `module` with the variant's forward; with `rows`, each batch row uses its own adapter."""
        if variant.forward_input is not None:
            transform = variant.forward_input if rows is None else partial(rows.forward_input, variant.forward_input)

            def pre_hook(mod, args, kwargs):
                if not self.live():
                    return None
                if args:
                    return (transform(args[0], leaves, site), *args[1:]), kwargs
                key = next(iter(kwargs))
                return args, {**kwargs, key: transform(kwargs[key], leaves, site)}

            self.add_hook(module, pre_hook, pre=True)
        else:
            forward = variant.forward if rows is None else partial(rows.forward, variant.forward)

            def hook(mod, args, kwargs, output):
                if not self.live():
                    return None
                x = args[0] if args else next(iter(kwargs.values()))
                return forward(x, output, leaves, site)

            self.add_hook(module, hook, pre=False)

    def add_hook(self, module: nn.Module, hook: Any, *, pre: bool) -> None:
        """Register a with-kwargs forward (pre-)hook for this call; `close` removes it."""
        if not torch.compiler.is_compiling():
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            self.handles.append(register(hook, with_kwargs=True))
            return
        self.handles.append(_SwappedHooks(module, hook, pre))

    def require_input_grad(self, layers: list[nn.Module]) -> list[Any]:
        """Reentrant checkpointing drops gradients unless an input requires grad: give the first one that."""

        def pre_hook(mod, args):
            if not self.running:
                return None
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    if a.requires_grad:
                        return None
                    return (*args[:i], a.detach().requires_grad_(), *args[i + 1 :])
            return None

        return [layer.register_forward_pre_hook(pre_hook) for layer in layers]

    def detach_base_in_recompute(self) -> None:
        """During a recompute in our backward, layers see their trainable base parameters detached."""

        def swap_in(module, args):
            if not self.live():
                return
            saved = {n: p for n, p in module._parameters.items() if p is not None and p.requires_grad}
            for name, p in saved.items():
                module._parameters[name] = p.detach()
            for name, tensor in self.replaced.get(module, {}).items():  # parameter-form targets, as in the forward
                saved.setdefault(name, module._parameters[name])
                module._parameters[name] = tensor
            self.swapped[module] = saved

        def swap_out(module, args, output):
            module._parameters.update(self.swapped.pop(module, {}))

        for module in self.model.modules():
            trainable = any(
                p.requires_grad and _is_plain_parameter(p) for p in module._parameters.values() if p is not None
            )
            if trainable or module in self.replaced:
                self.handles.append(module.register_forward_pre_hook(swap_in))
                self.handles.append(module.register_forward_hook(swap_out, always_call=True))

    def route_quantized_layers(self) -> None:
        """Under torch.func, every bnb layer runs through `QuantizedLinear` for this call."""
        for module in self.model.modules():
            if is_linear_like(module) and quantization(module) is not None:
                self.patched[module] = module.__dict__.get("forward", _MISSING)
                module.forward = lambda x, m=module: QuantizedLinear.apply(x, m)

    # -- lifetime -------------------------------------------------------------------------------
    def after_forward(self, output: Any, *, checkpointing: bool) -> None:
        """Remove the hooks now, or keep them inert until backward through `output` ends."""
        if _in_transform() or not torch.is_grad_enabled():
            self.close()
            return
        tensors = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        if not tensors:
            self.close()
            return
        if checkpointing:
            self.detach_base_in_recompute()
        _PENDING.setdefault(self.model, set()).add(self)
        self.pending = True
        self.open_outputs = len(tensors)
        for t in tensors:
            t.register_hook(self._on_backward)
            weakref.finalize(t, self._output_released)

    def _on_backward(self, grad: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task not in self.tasks:
            self.tasks.add(task)
            Variable._execution_engine.queue_callback(self.close)

    def _output_released(self) -> None:
        self.open_outputs -= 1
        if self.open_outputs <= 0:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for handle in reversed(self.handles):
            handle.remove()
        self.handles.clear()
        for module, saved in self.swapped.items():
            module._parameters.update(saved)
        self.swapped.clear()
        for module, own in self.patched.items():
            if own is _MISSING:
                del module.forward
            else:
                module.forward = own
        self.patched.clear()
        self.tasks.clear()
        if self.pending:  # only then: torch.compile would guard on _PENDING's size (a recompile per change)
            _PENDING.get(self.model, set()).discard(self)


def resolve_sites(model: nn.Module, params: Params, caller: str) -> list[tuple[nn.Module, Site]]:
    """Each target of `params` located in `model` and checked against it (`lora_func.kinds.site_for`)."""
    sites = []
    for target in params.targets:
        site = site_for(model, target, params.config, caller)
        sites.append((site.base.module, site))
    return sites


def apply(
    model: nn.Module,
    params: Params,
    batch: Any,
    *,
    adapter_ids: torch.Tensor | Sequence[int] | None = None,
) -> Any:
    """Run `model` on `batch` with the adapter `params` injected; the model is left as it was.

    `batch`: a Mapping is called as `model(**batch)`, a tuple/list as `model(*batch)`, anything else as
    `model(batch)`. Returns what the model returns (HF: `.loss` when the batch has labels).

    >>> loss = lf.apply(model, params, batch).loss
    >>> loss.backward()  # gradients land on the trainable leaves only

    Only the adapter trains: a base parameter that requires grad and is not in the config's `modules_to_save`
    still gets no gradient (its flag is left as it is); name a module in `modules_to_save` to train a copy of it.

    Stacked params (`lf.stack`, K adapters) run either under `torch.func.vmap`, all K on the whole batch,
    or with `adapter_ids`: one id per batch row (1-D integer tensor or ints), row i using adapter
    `adapter_ids[i]` and -1 the base model. Inference and training both work, for every variant; each
    adapter's gradient comes from its own rows only. Cost: see `lora_func/_mixed.py`.

    >>> out = lf.apply(model, lf.stack([p0, p1, p2]), batch, adapter_ids=torch.tensor([2, 0, -1, 2]))
    """
    if not isinstance(params, Params):
        raise TypeError(
            f"apply: `params` must be lora_func Params (from lf.init or lf.load), got {type(params).__name__}"
        )
    variant = variant_for(params.config, caller="apply")
    sites = resolve_sites(model, params, "apply")
    count = stack_size(params, "apply")
    rows = None
    if adapter_ids is not None:
        if count is None:
            raise ValueError(
                "apply: `adapter_ids` picks among stacked adapters, but `params` holds a single adapter; "
                "stack K adapters with lf.stack"
            )
        rows = AdapterRows(adapter_ids, count, "apply")
    elif count is not None:
        raise ValueError(
            f"apply: `params` stacks {count} adapters (a leading dimension of {count} on every leaf); run them "
            "with torch.func.vmap(lambda p: lf.apply(model, p, batch))(params), or give `adapter_ids` "
            "to pick one adapter per batch row"
        )
    layers = _checkpointed_layers(model)
    in_transform = _in_transform()
    if in_transform and layers and not torch.compiler.is_compiling():
        raise RuntimeError(
            "apply: gradient checkpointing is on, and torch.utils.checkpoint cannot run under torch.func "
            "transforms (grad, vmap, ...); call model.gradient_checkpointing_disable() for torch.func, "
            "or keep checkpointing and train with loss.backward()"
        )
    injection = Injection(model, "apply")
    replacements = {}  # parameter-form targets: state-dict name -> tensor, put in through functional_call
    for module, site in sites:
        form = form_of(variant, site.target)
        leaves = with_shared(params, site.target.path)
        if form.where != "parameters":
            injection.add_target(module, variant, leaves, site, rows)
            continue
        if rows is not None:
            raise ValueError(
                f"apply: `adapter_ids` mixes adapters per row, but {site.target.path!r} ({site.target.kind}) is "
                "injected by replacing its parameters, one set per call; run each adapter on its own rows"
            )
        named = form.run(leaves, site)
        injection.replaced.setdefault(module, {}).update(named)
        prefix = f"{form.module_path}." if form.module_path else ""
        replacements.update({prefix + name: tensor for name, tensor in named.items()})
    if in_transform or rows is not None:  # mixed batches vmap the variants, which may call the base layer
        injection.route_quantized_layers()
    input_grad_handles = injection.require_input_grad(layers) if layers else []
    overrides = _trainable_base(model) if torch.is_grad_enabled() else None
    if replacements:
        overrides = {**(overrides or {}), **replacements}
    injection.running = True
    try:
        output = call_model(model, batch, overrides)
    except BaseException:
        injection.close()
        raise
    finally:
        injection.running = False
        for handle in input_grad_handles:
            handle.remove()
    injection.after_forward(output, checkpointing=bool(layers))
    return output


def with_shared(params: Params, path: str) -> dict[str, torch.Tensor]:
    """A target's leaves, plus the shared ones (VeRA) where the adapter has them."""
    leaves = params[path]
    if SHARED in params:
        return {**params[SHARED], **leaves}
    return leaves
