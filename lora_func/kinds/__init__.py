"""The layer-kind registry: one line per kind file. Adding a kind is one file and one line here.

A kind says how to recognise a module, its features and layout, how to read its dense weight, and how the
low-rank family acts on it (see `lora_func/_kind.py`). A variant lists the kinds it supports
(`Variant.kinds`); `leaf_shapes` refuses the others, naming the variant and the module.

What the injection needs, per target of an adapter (the contract with `lora_func/_inject/`):

    site = site_for(model, target, cfg, caller)      # the target located, checked, with its read-only base view
    form = form_of(variant, site.target, alone)      # alone: the site, for a call of one adapter run eagerly
    form.where == "output":      y' = form.run(x, y, leaves, site)   at the forward output of `form.module_path`
    form.where == "input":       x' = form.run(x, leaves, site)      at its forward input (x: first positional)
    form.where == "parameters":  form.run(leaves, site) -> {parameter name within the module: tensor}, put in
                                 place of those parameters for the duration of that module's forward

`leaves` are the target's own leaves merged with the shared ones (VeRA). `declared_shapes` gives every leaf's
declared shape for a config and its targets (the structure every entry point checks), `frozen_leaves` which of
a target's leaves do not train, `target_to_json` / `target_from_json` a target's file form.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from .._config import ROLES, AdapterConfig, config_for
from .._kind import SHARED, BaseLayer, Kind, Target
from .._variant import LINEAR_LIKE, Leaves, ParameterForm, Site, Variant
from . import block, conv, conv1d, embedding, experts, linear, norm, saved

KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        linear.KIND,
        conv1d.KIND,
        conv.KIND,
        embedding.KIND,
        experts.KIND,
        norm.KIND,
        saved.KIND,
        block.KIND,
    )
}


def module_kind(module: nn.Module, variant: Variant | None = None) -> Kind | None:
    """The first registered kind that recognises `module` as one of its layers, or None. With a `variant`, a
    `listed_only` kind (norm layers, a model's blocks) counts only if the variant lists it."""
    for kind in KINDS.values():
        if kind.listed_only and variant is not None and kind.name not in variant.kinds:
            continue
        if kind.recognise is not None and kind.recognise(module):
            return kind
    return None


def kind_of(target: Target) -> Kind:
    kind = KINDS.get(target.kind)
    if kind is None:
        raise ValueError(f"target {target.path!r} has kind {target.kind!r}, which is not one of {sorted(KINDS)}")
    return kind


def owns_leaves(target: Target) -> bool:
    """Whether the target's leaves are its kind's own (saved module copies), not its variant's."""
    return kind_of(target).leaf_shapes is not None


def variant_targets(targets: tuple[Target, ...]) -> tuple[Target, ...]:
    """The targets a variant adapts: all but the saved module copies."""
    return tuple(t for t in targets if not owns_leaves(t))


def target_config(cfg: AdapterConfig, path: str) -> AdapterConfig:
    """The config a variant sees for one target (`config_for`), without the lru_cache where there is nothing to
    resolve (torch.compile warns about the cache)."""
    return config_for(cfg, path) if cfg.rank_pattern or cfg.alpha_pattern else cfg


def supports(variant: Variant, kind: str) -> bool:
    """Whether `variant` can adapt layers of `kind`: the kinds it lists, and saved copies (no variant's business)."""
    return KINDS[kind].leaf_shapes is not None or kind in variant.kinds


def require_support(variant: Variant, target: Target, cfg: AdapterConfig) -> None:
    """A variant adapts only the kinds it lists."""
    if not supports(variant, kind_of(target).name):
        raise ValueError(
            f"{type(cfg).__name__} cannot adapt {target.path!r} ({target.module}): "
            f"{variant.name} supports {', '.join(variant.kinds)}"
        )


def leaf_shapes(variant: Variant, target: Target, cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """`{leaf: shape}` of one target: its kind's own (saved copies) or its variant's, which must support its kind."""
    kind = kind_of(target)
    if kind.leaf_shapes is not None:
        return {k: tuple(v) for k, v in kind.leaf_shapes(target).items()}
    require_support(variant, target, cfg)
    return {k: tuple(v) for k, v in variant.shapes(target, target_config(cfg, target.path)).items()}


def declared_shapes(
    variant: Variant, cfg: AdapterConfig, targets: tuple[Target, ...]
) -> dict[str, dict[str, tuple[int, ...]]]:
    """`{path: {leaf: shape}}` of one (unstacked) adapter of this config and these targets, the shared entry last."""
    shapes = {t.path: leaf_shapes(variant, t, cfg) for t in targets}
    if variant.shared_shapes is not None and variant_targets(targets):
        shapes[SHARED] = {k: tuple(v) for k, v in variant.shared_shapes(variant_targets(targets), cfg).items()}
    return shapes


def frozen_leaves(variant: Variant, path: str, targets_by_path: Mapping[str, Target]) -> tuple[str, ...]:
    """The leaves of entry `path` that do not train: none of a saved copy's, else the variant's `frozen`."""
    target = targets_by_path.get(path)
    if target is not None and owns_leaves(target):
        return ()
    return variant.frozen


def locate(model: nn.Module, target: Target, caller: str, modules: Mapping[str, nn.Module] | None = None) -> BaseLayer:
    """The read-only view of `target`'s base layer in `model` (looked up in `modules`, its `named_modules()`, where
    the caller has them), checked to be the kind and shape it was built for."""
    kind = kind_of(target)
    path = kind.module_path(target) if kind.module_path is not None else target.path
    try:
        module = model.get_submodule(path) if modules is None else modules[path]
    except (AttributeError, KeyError):
        raise ValueError(f"{caller}: target {target.path!r} is not a module of {type(model).__name__}") from None
    problem = kind.check(module, target)
    if problem is not None:
        raise ValueError(f"{caller}: target {target.path!r} {problem}")
    # Where the caller has `modules` (apply and inject, on every call), the structure check has refused a weight
    # on meta already (`lora_func._structure`), reading it anyway; elsewhere it is checked here.
    if modules is None and _on_meta(kind, target, module):
        raise ValueError(meta_weight_error(caller, target.path, module))
    return BaseLayer(kind, target, module)


def meta_weight_error(caller: str, path: str, module: nn.Module) -> str:
    return (
        f"{caller}: target {path!r} ({type(module).__name__}) has its weight on the meta device, which "
        "holds no values: the model is offloaded (accelerate's cpu_offload, disk_offload, or a device_map with "
        "'cpu'/'disk' offload) or was built on meta. Its weight is loaded only inside the module's own forward, "
        "and lora_func reads it outside (init, merge, and the adapter's forward at the module's output). Load "
        "the model with every weight in memory on its device (a device_map without offload)"
    )


def refuse_offloaded(model: nn.Module, caller: str) -> None:
    """Refuse a model that accelerate has offloaded (`cpu_offload`, `disk_offload`, `dispatch_model` with a
    device_map that offloads): its weights sit on the meta device between calls, loaded only inside each module's
    own forward, while lora_func reads weights outside it and keeps a trainable base's gradients out by
    replacing its parameters for the call. Walks the model only where accelerate has hooked its root."""
    if "_hf_hook" not in model.__dict__ and "hf_device_map" not in model.__dict__:
        return
    for name, p in model.named_parameters():
        if p.is_meta:
            raise ValueError(
                f"{caller}: {type(model).__name__} is offloaded: its parameter {name!r} is on the meta device "
                "(accelerate's cpu_offload, disk_offload, or a device_map with 'cpu'/'disk' offload keep weights "
                "there, loading each module's only inside its own forward). lora_func needs every weight in memory: "
                "load the model with a device_map without offload"
            )


def _on_meta(kind: Kind, target: Target, module: nn.Module) -> bool:
    """Whether the base weight the adapter reads is on the meta device (no values)."""
    if kind.leaf_shapes is not None:  # a saved copy: the module's parameters
        return any(p.is_meta for p in module.parameters())
    name = "weight" if kind.module_path is None else target.path.rpartition(".")[2]  # a parameter target: its own
    tensor = module._parameters.get(name)
    if tensor is None:
        tensor = getattr(module, name, None)
    return isinstance(tensor, torch.Tensor) and tensor.is_meta


def site_for(
    model: nn.Module, target: Target, cfg: AdapterConfig, caller: str, modules: Mapping[str, nn.Module] | None = None
) -> Site:
    """`target` located in `model` and checked against it, with the config it sees and its read-only base view."""
    return Site(target, target_config(cfg, target.path), locate(model, target, caller, modules))


class Form(NamedTuple):
    """How one target is injected: where ("output", "input" or "parameters"), on which module, by what function."""

    where: str
    module_path: str
    run: Callable


def form_of(variant: Variant, target: Target, alone: Site | None = None) -> Form:
    """How `target` is injected. `alone`: its site, when the call runs one adapter eagerly (no `adapter_ids`, not
    traced by torch.compile), where a variant's `ParameterForm` may apply."""
    kind = kind_of(target)
    path = kind.module_path(target) if kind.module_path is not None else target.path
    if kind.parameter_form or (alone is not None and _runs_on_parameters(variant, alone)):
        return Form("parameters", path, lambda leaves, site: merged_parameters(variant, site, leaves))
    if variant.forward_input is not None and (variant.forward is None or target.kind in LINEAR_LIKE):
        return Form("input", path, variant.forward_input)  # with both forms: the output form off linear-like kinds
    return Form("output", path, variant.forward)


def _runs_on_parameters(variant: Variant, site: Site) -> bool:
    form = variant.capability(ParameterForm)
    return form is not None and form.applies(site)


def merged_parameters(variant: Variant, site: Site, leaves: Leaves) -> dict[str, torch.Tensor]:
    """`{parameter name within the module: tensor}`: the adapter folded into the target's parameters (a saved copy:
    the copy itself), in the module's layout. Differentiable with respect to `leaves`; a bias only if it changed."""
    base = site.base
    if base.kind.parameters is not None:
        return base.kind.parameters(base, leaves)
    bias = base.bias
    bias = None if bias is None else bias.float()
    weight, new_bias = variant.merge(base.weight(), bias, leaves, site)
    return base.kind.state(base, weight, None if new_bias is bias else new_bias)


def device_of(base: BaseLayer) -> torch.device:
    """Where a target's leaves live: next to its base weight."""
    if base.kind.module_path is not None:  # a parameter target: that parameter
        return getattr(base.module, base.target.path.rpartition(".")[2]).device
    weight = getattr(base.module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    own = next(base.module.parameters(recurse=False), None)
    if own is None:  # a block: the parameters of its layers
        own = next(base.module.parameters())
    return own.device


def create_leaves(variant: Variant, site: Site, init) -> Leaves:
    """A target's initial leaves: its kind's own (saved copies) or its variant's `create`."""
    base = site.base
    if base.kind.create is not None:
        return base.kind.create(base, site.config.dtype)
    return variant.create(site.target, site.config, init)


# ---- a target's file form -----------------------------------------------------------------------------------------

_FIELDS = ("path", "d_in", "d_out", "roles", "kind", "module", "layout")


def target_to_json(target: Target) -> dict[str, Any]:
    """The target as a JSON object (the layout as `{field: value}`, tuples as lists)."""
    return json.loads(
        json.dumps(
            {
                "path": target.path,
                "d_in": target.d_in,
                "d_out": target.d_out,
                "roles": list(target.roles),
                "kind": target.kind,
                "module": target.module,
                "layout": dict(target.layout),
            }
        )
    )


TARGET_ROLES = (("reader",), ("writer",), ("reader", "writer"), ("inner",))  # what `roles_of` gives a layer


def target_from_json(row: Any, where: str) -> Target:
    """Rebuild a target from `target_to_json`'s object, every field checked; a ValueError names the field."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a stored target is not a JSON object: {row!r}")
    keys = set(row)
    if keys != set(_FIELDS):
        missing, extra = sorted(set(_FIELDS) - keys), sorted(keys - set(_FIELDS))
        raise ValueError(f"{where}: a stored target has missing fields {missing} and unknown fields {extra}")
    path = row["path"]
    if not isinstance(path, str):
        raise ValueError(f"{where}: target field `path` must be a string, got {path!r}")
    at = f"{where}: target {path!r}"
    kind = KINDS.get(row["kind"]) if isinstance(row["kind"], str) else None
    if kind is None:
        raise ValueError(f"{at}: field `kind` must be one of {sorted(KINDS)}, got {row['kind']!r}")
    saved = kind.leaf_shapes is not None  # a module copy: no features, no roles
    for name in ("d_in", "d_out"):
        value = row[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if saved else 1):
            raise ValueError(f"{at}: field `{name}` must be an int >= {0 if saved else 1}, got {value!r}")
    roles = row["roles"]
    allowed = [[]] if saved else [list(r) for r in TARGET_ROLES]
    if roles not in allowed:
        raise ValueError(f"{at}: field `roles` must be one of {allowed} (roles are {ROLES}), got {roles!r}")
    if not isinstance(row["module"], str) or not row["module"]:
        raise ValueError(f"{at}: field `module` must be a class name, got {row['module']!r}")
    layout = row["layout"]
    if not isinstance(layout, dict) or set(layout) != set(kind.layout_fields):
        raise ValueError(
            f"{at}: field `layout` must hold exactly {sorted(kind.layout_fields)} for a {kind.name} target, "
            f"got {layout!r}"
        )
    parsed = []
    for field, parse in kind.layout_fields.items():
        try:
            parsed.append((field, parse(layout[field])))
        except ValueError as e:
            raise ValueError(f"{at}: field `layout`: {e}") from None
    return Target(path, row["d_in"], row["d_out"], tuple(roles), kind.name, row["module"], tuple(parsed))
