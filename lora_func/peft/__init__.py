"""`to_peft` / `from_peft`: exchange with Hugging Face PEFT's `adapter_model.safetensors` + `adapter_config.json`.

PEFT is not imported: both files are written and read directly, in the layout `PeftModel.save_pretrained`
produces (tensor keys `base_model.model.<module path>.<PEFT name>`, config JSON with `indent=2, sort_keys=True`).

One file per method in this folder, each ending with `METHOD = PeftMethod(...)` (`_method.py`): the lora_func
variant, PEFT's `peft_type`, leaf <-> tensor names, the PEFT config fields and what each may hold, and the
translations both ways. `METHODS` below registers each with one line. Shared machinery: `_fields.py` (the two
files, field checks, patterns), `_targeting.py` (PEFT's module selection <-> lora_func's regexes).

Reading is as strict as `lf.load` (PEFT itself loads leniently): every config field is either translated,
inert (no effect on the adapted function, e.g. `lora_dropout`), or must hold its default; a field lora_func
does not know is refused unless it is unset (null, false, empty). The modules PEFT would adapt are computed
with PEFT's own matching rules, must all be linear-like, and must be exactly the modules the tensor file
holds; shapes and dtypes are checked against the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .._config import AdapterConfig, config_for
from .._init import finish_leaves
from .._params import SHARED, Params
from .._serialize import check_model
from .._targets import find_targets, is_linear_like
from .._variant import Init
from ..variants import REGISTRY, variant_for
from . import delora, dora, hra, ia3, ia3ff, lora, pissa, road, vera
from ._fields import (
    CONFIG_NAME,
    KEY_PREFIX,
    SHARED_REQUIRED,
    WEIGHTS_NAME,
    check_fields,
    number,
    patterns_in,
    patterns_out,
    read_config,
    read_tensors,
    resolved,
)
from ._method import PeftMethod
from ._targeting import exact_regex, peft_selection, target_modules_out, targeting_config

__all__ = ["CONFIG_NAME", "METHODS", "WEIGHTS_NAME", "PeftMethod", "config_from_peft", "from_peft", "to_peft"]

# Entries sharing a peft_type are tried in order: the more specific claim first.
METHODS: tuple[PeftMethod, ...] = (
    pissa.METHOD,
    dora.METHOD,
    lora.METHOD,
    delora.METHOD,
    ia3.METHOD,
    ia3ff.METHOD,
    hra.METHOD,
    vera.METHOD,
    road.METHOD,
)


def _method_for_variant(name: str, caller: str) -> PeftMethod:
    for method in METHODS:
        if method.variant == name:
            return method
    known = sorted({m.variant for m in METHODS})
    raise ValueError(f"{caller}: variant {name!r} has no PEFT counterpart in lora_func's exchange (it maps {known})")


def to_peft(params: Params, directory: str | os.PathLike, *, model: nn.Module | None = None) -> None:
    """Write `params` as a PEFT checkpoint: `adapter_model.safetensors` + `adapter_config.json` in `directory`.

    `PeftModel.from_pretrained(base_model, directory)` then computes what `lf.apply(base_model, params, ...)`
    does. `target_modules` is a regex that selects exactly the adapted modules; with `model` (the base model,
    only read) it is the short list of module names PEFT users write (`["q_proj", "v_proj"]`) where that
    selects exactly the same modules, and `base_model_name_or_path`/`auto_mapping` are filled in as PEFT does.

    Methods: LoRA (rsLoRA, rank/alpha patterns), PiSSA (written as the equivalent rank-2r LoRA, see the module
    docstring), DeLoRA, DoRA (PEFT LoRA with `use_dora`), IA3 and IA3-FF (PEFT IA3, `feedforward_modules` none or
    all of the targets), HRA, VeRA (projections stored, `save_projection=True`), ROAD (`group_size=None` written as
    the int it resolves to, where that is one int for all targets).

    >>> lf.to_peft(params, "out/peft-adapter", model=model)
    >>> peft_model = peft.PeftModel.from_pretrained(model, "out/peft-adapter")
    """
    if not isinstance(params, Params):
        raise TypeError(f"to_peft: `params` must be lora_func Params, got {type(params).__name__}")
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise ValueError(f"to_peft: `directory` {directory!r} is a file, not a directory")
    method = _method_for_variant(variant_for(params.config, caller="to_peft").name, "to_peft")
    if model is not None:
        check_model(model, params.targets, "to_peft")
    if method.export_as is not None:
        params = method.export_as(params)
        method = _method_for_variant(variant_for(params.config, caller="to_peft").name, "to_peft")

    cfg = params.config
    paths = [t.path for t in params.targets]
    if "" in paths:
        raise ValueError("to_peft: the root module is a target, and PEFT cannot adapt the root of a model")
    tensors = {}
    for path, leaf, tensor in params.leaves():
        names = method.shared_keys if path == SHARED else method.keys
        if leaf not in names:
            if method.rebuild is not None and path != SHARED:
                continue  # made again from the base layer on import
            where = "the shared leaf" if path == SHARED else "leaf"
            raise ValueError(f"to_peft: {where} {path}.{leaf} has no PEFT name in the {method.variant!r} entry")
        tensor = method.tensor_out(leaf, tensor.detach().to("cpu")).contiguous()
        tensors[names[leaf] if path == SHARED else f"{KEY_PREFIX}{path}.{names[leaf]}"] = tensor

    fields: dict[str, Any] = {
        "peft_type": method.peft_type,
        "task_type": None,
        "base_model_name_or_path": (getattr(model, "name_or_path", None) or None) if model is not None else None,
        "revision": None,
        "inference_mode": True,
        "target_modules": target_modules_out(paths, model),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        **SHARED_REQUIRED,
        **method.required,
        **method.inert,
    }
    for name in method.absent:
        del fields[name]
    fields.update(method.fields_out(cfg, fields))
    for names, value, pairs, pattern_name in (
        (method.rank_fields, cfg.r, cfg.rank_pattern, "rank_pattern"),
        (method.alpha_fields, cfg.alpha, cfg.alpha_pattern, "alpha_pattern"),
    ):
        if names is None:
            continue
        fields[names[0]] = number(value)
        if names[1] is not None:
            pattern = patterns_out(pairs, value, paths, pattern_name, "to_peft")
            fields[names[1]] = {k: number(v) for k, v in pattern.items()}
        elif any(resolved(pairs, p, value) != value for p in paths):
            raise ValueError(
                f"to_peft: `{pattern_name}` gives some targets another value, and PEFT's {method.peft_type} has one "
                f"`{names[0]}` for all"
            )
    if model is not None:
        fields["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        f.write(json.dumps(fields, indent=2, sort_keys=True))


def _candidates(fields: Mapping[str, Any], where: str) -> list[PeftMethod]:
    peft_type = fields.get("peft_type")
    candidates = [m for m in METHODS if m.peft_type == peft_type]
    if not candidates:
        known = sorted({m.peft_type for m in METHODS})
        raise ValueError(f"{where}: `peft_type`={json.dumps(peft_type)} is not one lora_func reads ({known})")
    return candidates


def config_from_peft(
    fields: Mapping[str, Any], model: nn.Module, *, where: str = "from_peft"
) -> tuple[PeftMethod, AdapterConfig, list[str]]:
    """The method entry, the lora_func config (dtype float32) and the module paths PEFT would adapt in `model`,
    for the fields of an `adapter_config.json`; every field checked."""
    candidates = _candidates(fields, where)
    selection = peft_selection(model, fields, where)
    if not selection:
        raise ValueError(f"{where}: `target_modules`={json.dumps(fields['target_modules'])} selects no module")
    method = next(m for m in candidates if m.claims(fields, selection, where))
    check_fields(fields, method, where)
    modules = dict(model.named_modules())
    for path in selection:
        if not is_linear_like(modules[path]):
            kind = type(modules[path]).__name__
            raise ValueError(
                f"{where}: `target_modules` selects {path!r} ({kind}), which is not linear-like; "
                "lora_func adapts modules with `in_features`, `out_features` and `weight` only"
            )
    kwargs: dict[str, Any] = {}
    for names, value, pattern in (
        (method.rank_fields, "r", "rank_pattern"),
        (method.alpha_fields, "alpha", "alpha_pattern"),
    ):
        if names is not None:
            if names[0] not in fields:
                raise ValueError(f"{where}: `{names[0]}` is missing")
            kwargs[value] = fields[names[0]]
            if names[1] is not None:
                kwargs[pattern] = patterns_in(fields, names[1], where)
    try:
        cfg = REGISTRY[method.variant].config(
            **kwargs,
            **targeting_config(fields, model),
            **method.fields_in(fields, where),
        )
    except (TypeError, ValueError) as e:
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where}: the config cannot be expressed in lora_func: {e}") from None
    return method, _exact_targets(cfg, model, selection), selection


def from_peft(directory: str | os.PathLike, model: nn.Module) -> Params:
    """Read a PEFT checkpoint directory (`adapter_model.safetensors` + `adapter_config.json`) as lora_func Params.

    `lf.apply(model, params, batch)` then computes what PEFT's `PeftModel.from_pretrained(model, directory)`
    does. Validated as strictly as `lf.load`: a config field lora_func cannot honour, a module PEFT would
    adapt that is not linear-like, missing or unexpected tensors, and wrong shapes are errors naming the
    field, key or module. `model` is only read.

    The config's `target_names` select exactly the modules PEFT's `target_modules` (and `exclude_modules`,
    `layers_to_transform`) select in `model`. `lora_dropout`/`module_dropout` are accepted and dropped: they do
    nothing at inference, and lora_func has no adapter dropout. The leaves' dtype is the file's; they train
    as after `lf.init`. Frozen leaves PEFT does not store (DoRA's ‖W_i‖², HRA's u0, VeRA's projections saved with
    `save_projection=False`) are rebuilt as the module docstring says.

    >>> params = lf.from_peft("peft-adapter/", model)
    """
    directory = os.fspath(directory)
    where = f"from_peft: {os.path.join(directory, CONFIG_NAME)!r}"
    if not os.path.isdir(directory):
        raise ValueError(f"from_peft: `directory` {directory!r} is not a directory")
    fields = read_config(directory)
    method, cfg, selection = config_from_peft(fields, model, where=where)
    variant = REGISTRY[method.variant]
    shared_stored = variant.create_shared is not None and method.shared_stored(fields)

    tensors = read_tensors(directory)
    where_weights = f"from_peft: {os.path.join(directory, WEIGHTS_NAME)!r}"
    expected = {f"{KEY_PREFIX}{path}.{name}" for path in selection for name in method.keys.values()}
    if shared_stored:
        expected |= set(method.shared_keys.values())
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{where_weights} has missing keys {missing[:5]} and unexpected keys {unexpected[:5]}")
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"{where_weights}: tensors must share one floating dtype, found {sorted(map(str, dtypes))}")
    cfg = dataclasses.replace(cfg, dtype=next(iter(dtypes)))
    found = tuple(find_targets(model, cfg, caller="from_peft"))

    entries: dict[str, dict[str, torch.Tensor]] = {}
    for target in found:
        target_cfg = config_for(cfg, target.path)
        try:
            shapes = variant.shapes(target, target_cfg)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        rank = f"r={target_cfg.r}, " if method.rank_fields is not None else ""
        leaves = {}
        for leaf, name in method.keys.items():
            key = f"{KEY_PREFIX}{target.path}.{name}"
            tensor = method.tensor_in(leaf, tensors[key], tuple(shapes[leaf]))
            if tuple(tensor.shape) != tuple(shapes[leaf]):
                stored = method.tensor_out(leaf, torch.empty(shapes[leaf], device="meta"))  # the PEFT layout
                raise ValueError(
                    f"{where_weights} key {key!r} has shape {tuple(tensors[key].shape)}, expected "
                    f"{tuple(stored.shape)} ({rank}{target.d_in} -> {target.d_out})"
                )
            leaves[leaf] = tensor
        module = model.get_submodule(target.path)
        if method.rebuild is not None:
            with torch.no_grad():
                leaves.update(method.rebuild(module, target_cfg, leaves))
        entries[target.path] = finish_leaves(variant, target.path, cfg, leaves, shapes, module.weight.device)
    if variant.create_shared is not None:
        shapes = variant.shared_shapes(found, cfg)
        if shared_stored:
            leaves = {}
            for leaf, key in method.shared_keys.items():
                tensor = method.tensor_in(leaf, tensors[key], tuple(shapes[leaf]))
                if tuple(tensor.shape) != tuple(shapes[leaf]):
                    raise ValueError(
                        f"{where_weights} key {key!r} has shape {tuple(tensors[key].shape)}, expected "
                        f"{tuple(shapes[leaf])} (shared by all {len(found)} targets)"
                    )
                leaves[leaf] = tensor
        else:
            leaves = variant.create_shared(found, cfg, Init(lambda: None, None))  # as `lf.init` draws them
        device = model.get_submodule(found[0].path).weight.device  # shared leaves sit with the first target, as in init
        entries[SHARED] = finish_leaves(variant, SHARED, cfg, leaves, shapes, device)
    return Params(entries, cfg, found)


def _exact_targets(cfg: AdapterConfig, model: nn.Module, selection: list[str]) -> AdapterConfig:
    """`cfg` if it selects exactly `selection` in `model`, else the same config with one exact-path regex."""
    try:
        if [t.path for t in find_targets(model, cfg, caller="from_peft")] == selection:
            return cfg
    except ValueError:
        pass
    exact = dataclasses.replace(
        cfg, target_names=(f"^(?:{exact_regex(selection)})$",), exclude_names=(), layers=None, target_roles=None
    )
    if [t.path for t in find_targets(model, exact, caller="from_peft")] != selection:
        raise RuntimeError(f"from_peft: internal error: no lora_func config selects exactly {selection[:3]}...")
    return exact
