"""The one structure check of a params pytree, and the one place leaf shapes are declared.

Every entry point checks its params here before anything runs or is written: `apply` and `inject` (with the
model), `merge`, `save`, `to_peft`, `stack`, `unstack`, `per_example_grads`; `init`, `load` and `from_peft` build
their leaves from `declared_shapes` and check the result the same way.

What is checked, in this order, each failure a ValueError naming the leaf (`path.leaf`), the rule and what was
expected:
- the targets are unique, none is the shared entry's name;
- the entries are the targets' paths, plus the shared entry (`SHARED`) exactly when the variant has shared leaves;
- each entry holds the leaves its variant declares: all of them (a whole adapter), or, where allowed, exactly the
  trainable or exactly the frozen ones (a half from `lf.split`); never an undeclared leaf;
- each leaf is a plain tensor (not a `DTensor`: leaves are whole on every rank) of the config's floating dtype,
  whose shape is the declared one, or `(K, *declared)` with the same K on every leaf (K stacked adapters,
  `lf.stack`); a shared leaf may be larger in the dims the targets size (`growing_dims`: it was made for more
  targets, of which these are some);
- the leaves of an entry sit on one device, the shared ones with the first target's (where `init` puts them);
  with `model`, each target's leaves sit on its module's device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import kinds
from ._config import AdapterConfig
from ._kind import Target
from ._params import SHARED, Params
from ._sharded import is_sharded
from .variants import variant_for

Shapes = dict[str, dict[str, tuple[int, ...]]]


def declared_shapes(config: AdapterConfig, targets: tuple[Target, ...], caller: str) -> Shapes:
    """`{path: {leaf: shape}}` of one (unstacked) adapter of this config and these targets, the shared entry
    included (`lora_func.kinds.declared_shapes`: a variant's leaves, or a saved module copy's own); the variant's
    `shapes` may refuse a target (a rank too large, a kind it does not adapt) with an error naming it."""
    return kinds.declared_shapes(variant_for(config, caller=caller), config, tuple(targets))


def growing_dims(config: AdapterConfig, targets: tuple[Target, ...]) -> dict[str, tuple[int, ...]]:
    """{shared leaf: its dims sized by the targets} (VeRA's A is (r, max d_in)): a shared leaf made for more
    targets than `targets` (an adapter cut down to some of its targets) may be larger there."""
    variant = variant_for(config, caller="check")
    adapted = kinds.variant_targets(tuple(targets))
    if variant.shared_shapes is None or not adapted:
        return {}
    # Wider by a factor r + 1, not by one: a dim may grow in steps of r (RandLoRA's ⌈min(d_in, d_out) / r⌉ bases).
    d_in, d_out = ((max(getattr(t, d) for t in adapted) + 1) * (config.r + 1) for d in ("d_in", "d_out"))
    wider = Target(SHARED, d_in, d_out, ("inner",), "linear", "Linear")
    now = variant.shared_shapes(adapted, config)
    grown = variant.shared_shapes((*adapted, wider), config)
    return {leaf: tuple(d for d, (a, b) in enumerate(zip(now[leaf], grown[leaf])) if a != b) for leaf in now}


def fits(shape: tuple[int, ...], want: tuple[int, ...], larger: tuple[int, ...] = ()) -> bool:
    """`shape` is `want`, but for the dims in `larger`, which may be larger."""
    return len(shape) == len(want) and all(
        s == w or (d in larger and s > w) for d, (s, w) in enumerate(zip(shape, want))
    )


_LAYOUTS: dict[tuple[int, int], tuple[AdapterConfig, tuple[Target, ...], Shapes, dict[str, tuple[int, ...]]]] = {}


def _layout(cfg: AdapterConfig, targets: tuple[Target, ...], caller: str, name: str):
    """(declared shapes, growing shared dims) of a config and target tuple, the targets checked; cached by the
    identity of both (every Params made from one `init` shares them), as `apply` checks on every call."""
    compiling = torch.compiler.is_compiling()  # then nothing is cached: dynamo would guard on the ids
    key = None if compiling else (id(cfg), id(targets))
    hit = None if key is None else _LAYOUTS.get(key)
    if hit is not None and hit[0] is cfg and hit[1] is targets:
        return hit[2], hit[3]
    if not targets:
        raise ValueError(f"{caller}: `{name}` has no targets")
    paths = [t.path for t in targets]
    if len(set(paths)) != len(paths):
        twice = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"{caller}: `{name}` lists the target {twice!r} twice")
    if SHARED in paths:
        raise ValueError(f"{caller}: `{name}` has a target named {SHARED!r}, the name of the shared entry")
    declared = declared_shapes(cfg, targets, caller)
    grows = growing_dims(cfg, targets) if SHARED in declared else {}
    if key is not None:
        if len(_LAYOUTS) >= 64:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        _LAYOUTS[key] = (cfg, targets, declared, grows)  # holds both: their ids stay theirs while cached
    return declared, grows


def check(
    params: Any,
    caller: str,
    *,
    stacked: bool | None = None,
    halves: bool = False,
    model: nn.Module | None = None,
    modules: Mapping[str, nn.Module] | None = None,
    values: bool = False,
    name: str = "params",
) -> int | None:
    """Check `params` (see the module docstring); return K for K stacked adapters, None for one adapter.

    stacked: None accepts both, False requires one adapter, True requires a stack.
    halves: also accept the trainable or the frozen half of `lf.split` (else only a whole adapter).
    model: also check that each target's leaves sit on its module's device (`modules`: the model's
        `named_modules()` as a dict, when the caller has it, to find them without walking the model again).
    values: the leaves' values are needed (to write them): none may be on the "meta" device.
    name: how messages call `params` (`adapters[1]` for `stack`).
    """
    if not isinstance(params, Params):
        raise TypeError(f"{caller}: `{name}` must be lora_func Params, got {type(params).__name__}")
    cfg = params.config
    if torch.compiler.is_compiling():  # nothing read from or written to the Params object: dynamo would guard on it
        variant, (declared, grows) = variant_for(cfg, caller=caller), _layout(cfg, params.targets, caller, name)
    else:  # resolved once per Params (`replace` passes the layout on), and once per (config, targets) in `_layout`
        variant = params.variant or variant_for(cfg, caller=caller)
        if params.layout is None:
            params.layout = _layout(cfg, params.targets, caller, name)
        declared, grows = params.layout
    entries = params._entries  # the Params' own dict: this runs on every `apply`
    if entries.keys() != declared.keys():
        missing = [p for p in declared if p not in entries]
        extra = [p for p in entries if p not in declared]
        raise ValueError(
            f"{caller}: `{name}` has entries for paths {extra[:3]} that are not among its targets, and none for "
            f"{missing[:3]}; an entry per target{' and the shared one' if SHARED in declared else ''}"
        )
    dtype = cfg.dtype
    names_checked = False
    sizes: set[int | None] = set()
    devices: dict[str, torch.device] = {}
    for path, entry in entries.items():
        want = declared[path]
        if not names_checked and entry.keys() != want.keys():
            _check_leaf_names(params, declared, variant, caller, name, halves)  # a half, or an error
            names_checked = True
        device = None
        for leaf, tensor in entry.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{caller}: leaf {path}.{leaf} is a {type(tensor).__name__}, not a torch.Tensor")
            if type(tensor) is not torch.Tensor and is_sharded(tensor):
                raise ValueError(
                    f"{caller}: leaf {path}.{leaf} is a DTensor; an adapter's leaves are plain tensors, whole on every "
                    "rank, on a sharded base too (docs/distributed.md): use its .full_tensor()"
                )
            if tensor.dtype != dtype:
                raise ValueError(f"{caller}: leaf {path}.{leaf} has dtype {tensor.dtype}, the config says {dtype}")
            shape, w = tensor.shape, want[leaf]
            if shape == w:
                sizes.add(None)
            elif len(shape) == len(w) + 1 and shape[1:] == w:
                sizes.add(shape[0])
            elif path == SHARED and fits(tuple(shape), w, grows.get(leaf, ())):
                sizes.add(None)
            elif path == SHARED and len(shape) == len(w) + 1 and fits(tuple(shape[1:]), w, grows.get(leaf, ())):
                sizes.add(shape[0])
            else:
                raise ValueError(
                    f"{caller}: leaf {path}.{leaf} has shape {tuple(shape)}; its variant declares {w} "
                    f"(or (K, {', '.join(map(str, w))}) for K stacked adapters)"
                )
            here = tensor.device
            if device is None:
                device, first = here, leaf
            elif here != device:
                raise ValueError(
                    f"{caller}: leaf {path}.{leaf} is on {here} and leaf {path}.{first} on {device}; the leaves of "
                    "one target sit on one device, its module's"
                )
            if values and here.type == "meta":
                raise ValueError(
                    f"{caller}: leaf {path}.{leaf} is on the meta device, which holds no values to {caller}"
                )
        if device is not None:
            devices[path] = device
    if len(sizes) > 1:
        _disagreeing_stack_sizes(params, declared, caller, name)
    count = next(iter(sizes), None)
    first_path = params.targets[0].path
    if SHARED in devices and first_path in devices and devices[SHARED] != devices[first_path]:
        raise ValueError(
            f"{caller}: the shared leaves of `{name}` are on {devices[SHARED]}, the first target's on "
            f"{devices[first_path]}; they sit with the first target, as lf.init puts them"
        )
    if model is not None:
        _check_devices(model, params, devices, caller, modules)
    if stacked is False and count is not None:
        raise ValueError(f"{caller}: `{name}` stacks {count} adapters; {caller} each of lf.unstack({name})")
    if stacked is True and count is None:
        raise ValueError(f"{caller}: `{name}` is not stacked (its leaves have the shapes of one adapter)")
    return count


def _disagreeing_stack_sizes(params: Params, declared: Shapes, caller: str, name: str) -> None:
    seen: dict[int | None, str] = {}
    for path, leaf, tensor in params.leaves():
        stacked = tensor.dim() == len(declared[path][leaf]) + 1
        seen.setdefault(tensor.shape[0] if stacked else None, f"{path}.{leaf}")
    shown = ", ".join(f"{leaf} ({'unstacked' if k is None else f'K={k}'})" for k, leaf in seen.items())
    raise ValueError(
        f"{caller}: the leaves of `{name}` disagree on the stack size: {shown}; under torch.func.vmap, "
        "vmap over both halves of lf.split (or over the combined params), not one of them"
    )


def _check_leaf_names(params: Params, declared: Shapes, variant: Any, caller: str, name: str, halves: bool) -> None:
    """Every entry holds all its declared leaves, or (with `halves`) exactly the trainable or the frozen ones."""
    by_path = {t.path: t for t in params.targets}
    frozen = {p: kinds.frozen_leaves(variant, p, by_path) for p in declared}
    for p, leaf in params.frozen:  # the leaves `lf.freeze` froze: in the frozen half too
        frozen[p] = (*frozen.get(p, ()), leaf)
    whole = True
    for path in params:
        held, want = params[path], declared[path]
        if len(held) != len(want) or any(leaf not in want for leaf in held):
            whole = False
            extra = [leaf for leaf in held if leaf not in want]
            if extra:
                raise ValueError(f"{caller}: `{name}` has a leaf {path}.{extra[0]} that its variant does not declare")
    if whole:
        return
    held = {p: set(params[p]) for p in params}
    for half, keep in (("trainable", False), ("frozen", True)):
        if held == {p: {leaf for leaf in d if (leaf in frozen[p]) == keep} for p, d in declared.items()}:
            if halves:
                return
            other = "frozen" if half == "trainable" else "trainable"
            raise ValueError(
                f"{caller}: `{name}` is the {half} half of lf.split (it lacks the {other} leaves); {caller} needs a "
                "whole adapter: lf.combine(trainable, frozen)"
            )
    path = next(p for p in declared if held[p] != set(declared[p]))
    missing = sorted(set(declared[path]) - held[path])
    raise ValueError(
        f"{caller}: leaf {path}.{missing[0]} is missing; its variant declares {sorted(declared[path])} for "
        f"{'the shared entry' if path == SHARED else 'each target'}"
    )


def _check_devices(
    model: nn.Module,
    params: Params,
    devices: dict[str, torch.device],
    caller: str,
    modules: Mapping[str, nn.Module] | None = None,
) -> None:
    kinds.refuse_offloaded(model, caller)  # an offloaded model by name first, then any target's weight on meta
    for target in params.targets:
        kind = kinds.kind_of(target)
        path = kind.module_path(target) if kind.module_path is not None else target.path  # experts: their module
        module = modules.get(path) if modules is not None else _submodule(model, path)
        if module is None:
            raise ValueError(f"{caller}: target {target.path!r} is not a module of {type(model).__name__}")
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if weight.device.type == "meta":  # offloaded (accelerate keeps such weights there), or a model built on meta
            raise ValueError(kinds.meta_weight_error(caller, target.path, module))
        device = devices.get(target.path)
        if device is not None and device != weight.device:
            raise ValueError(
                f"{caller}: the leaves of target {target.path!r} are on {device}, its module's weight on "
                f"{weight.device}; move the adapter to the model's device "
                "(optree.tree_map(lambda t: t.to(device), params))"
            )


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
