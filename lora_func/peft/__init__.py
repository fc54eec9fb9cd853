"""`to_peft` / `from_peft`: exchange with Hugging Face PEFT's `adapter_model.safetensors` + `adapter_config.json`.

PEFT is not imported: both files are written and read directly, in the layout `PeftModel.save_pretrained`
produces (tensor keys `base_model.model.<module path>.<PEFT name>`, config JSON with `indent=2, sort_keys=True`).

One file per method in this folder, each ending with `METHOD = PeftMethod(...)` (`_method.py`): the lora_func
variant, PEFT's `peft_type`, leaf <-> tensor names, the PEFT config fields and what each may hold, and the
translations both ways. A variant names its file in its own declaration (`PeftExchange` in
`Variant.capabilities`); `METHODS` below is read from the variant registry. Shared machinery: `_fields.py` (the two
files, field checks, patterns), `_targeting.py` (PEFT's module selection <-> lora_func's regexes).

Reading is as strict as `lf.load` (PEFT itself loads leniently): every config field is either translated,
inert (no effect on the adapted function), or must hold its default; a field lora_func does not know is refused
unless it is unset (null, false, empty). The modules PEFT would adapt are computed with PEFT's own matching
rules, must all be layers lora_func and PEFT's method both adapt, and must be exactly the modules the tensor file
holds; shapes and dtypes are checked against the model. Layer kinds beyond nn.Linear (transformers Conv1D,
convolutions, embeddings, fused experts through `target_parameters`, `modules_to_save` copies) are laid out as
PEFT lays them out: see `_kinds.py`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .._config import AdapterConfig, config_for
from .._init import assemble
from .._params import SHARED, Params
from .._serialize import AdapterFileError, check_model
from .._sharded import model_class
from .._structure import check
from .._targets import find_targets
from .._variant import Init, PeftExchange
from ..kinds import KINDS, leaf_shapes, locate, module_kind, site_for, variant_targets
from ..variants import REGISTRY, variant_for
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
    written,
)
from ._kinds import base_weight_key, check_kind, fan_in_fan_out, from_file, stored_layout, tensor_key, to_file
from ._method import PeftMethod, claims_any
from ._targeting import (
    exact_regex,
    peft_parameters,
    peft_saved,
    peft_selection,
    target_modules_out,
    targeting_config,
)

__all__ = ["CONFIG_NAME", "METHODS", "WEIGHTS_NAME", "PeftMethod", "config_from_peft", "from_peft", "to_peft"]


def _methods() -> tuple[PeftMethod, ...]:
    """Each registered variant's `PeftExchange` module's `METHOD`, in registry order, but for the entries that claim
    any config of their `peft_type` (`claims_any`: plain LoRA), which go last: entries sharing a `peft_type` are
    tried in order, the more specific claim first (PiSSA and DoRA before LoRA)."""
    methods = []
    for variant in REGISTRY.values():
        exchange = variant.capability(PeftExchange)
        if exchange is None:
            continue
        method = importlib.import_module(f"{__name__}.{exchange.module}").METHOD
        if method.variant != variant.name:
            raise RuntimeError(
                f"lora_func.peft.{exchange.module} maps variant {method.variant!r}, not {variant.name!r}"
            )
        methods.append(method)
    return tuple(sorted(methods, key=lambda m: m.claims is claims_any))


METHODS: tuple[PeftMethod, ...] = _methods()


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
    the int it resolves to, where that is one int for all targets), LoHa (linear and Conv1d/2d layers), LoKr, OFT
    (v2; `r` or `oft_block_size` as set), MiSS (`init_weights` true, false or "mini"), SHiRA (its random mask's
    `shira_indices` written too), FourierFT (linear and Conv1D layers), AdaLoRA (the kept ranks and `rank_pattern`,
    as PEFT saves them after its allocator ran), RandLoRA (bases stored, and copied under every target as PEFT
    writes them), VBLoRA (full logits, or PEFT's top-k file with `save_only_topk_weights`). Layer kinds beyond
    nn.Linear (transformers Conv1D, convolutions, embeddings, fused experts, `modules_to_save` copies) as
    `_kinds.py` says; `dropout` as `lora_dropout`.

    >>> lf.to_peft(params, "out/peft-adapter", model=model)
    >>> peft_model = peft.PeftModel.from_pretrained(model, "out/peft-adapter")
    """
    check(params, "to_peft", stacked=False, values=True)  # PEFT's tensors are one adapter's, whole
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise ValueError(f"to_peft: `directory` {directory!r} is a file, not a directory")
    method = _method_for_variant(variant_for(params.config, caller="to_peft").name, "to_peft")
    if model is not None:
        check_model(model, params.targets, "to_peft")
        if method.check_model is not None:
            method.check_model(model, params.targets, "to_peft")
    for target in params.targets:
        check_kind(method, target, "to_peft")
    # Saved module copies are written as they are, whatever the method: the method sees the adapted targets only.
    copies = {t.path: params[t.path] for t in params.targets if KINDS[t.kind].leaf_shapes is not None}
    if copies:
        adapted = {p: e for p, e in params.items() if p not in copies}
        params = Params(adapted, params.config, variant_targets(params.targets))
    leaf_fields = method.leaf_fields(params) if method.leaf_fields is not None else {}
    if method.export_as is not None:
        params = method.export_as(params)
        method = _method_for_variant(variant_for(params.config, caller="to_peft").name, "to_peft")

    cfg = params.config
    targets = params.targets
    by_path = {t.path: t for t in targets}
    paths = [t.path for t in targets if t.kind != "experts"]  # modules; expert parameters go to `target_parameters`
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
        tensor = tensor.detach().to("cpu")
        if path == SHARED:
            tensors[names[leaf]] = method.tensor_out(leaf, tensor).contiguous()
        else:
            target = by_path[path]
            tensors[tensor_key(method, target, leaf, targets)] = to_file(method, target, leaf, tensor).contiguous()
    for path, entry in copies.items():
        for leaf, tensor in entry.items():
            tensors[f"{KEY_PREFIX}{path}.{leaf}"] = tensor.detach().to("cpu").contiguous()
    for target in targets if method.derived else ():
        for name, make in method.derived.items():
            tensors[f"{KEY_PREFIX}{target.path}.{name}"] = make(target, config_for(cfg, target.path)).contiguous()

    fields: dict[str, Any] = {
        "peft_type": method.peft_type,
        "task_type": None,
        "base_model_name_or_path": (getattr(model, "name_or_path", None) or None) if model is not None else None,
        "revision": None,
        "inference_mode": True,
        "target_modules": target_modules_out(paths, model) if paths else [],
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
    fields.update(leaf_fields)
    if "fan_in_fan_out" in fields:
        fields["fan_in_fan_out"] = fan_in_fan_out(targets, "to_peft")
    if any(t.kind == "experts" for t in targets):
        fields["target_parameters"] = [t.path for t in targets if t.kind == "experts"]
    if copies:
        fields["modules_to_save"] = list(copies)
    paths = [t.path for t in targets]  # rank and alpha patterns resolve on parameter targets too
    for names, value, pairs, pattern_name in (
        (method.rank_fields, cfg.r, cfg.rank_pattern, "rank_pattern"),
        (method.alpha_fields, cfg.alpha, cfg.alpha_pattern, "alpha_pattern"),
    ):
        if names is None:
            continue
        fields[names[0]] = written(value)
        if names[1] is not None:
            pattern = patterns_out(pairs, value, paths, pattern_name, "to_peft")
            fields[names[1]] = {k: written(v) for k, v in pattern.items()}
        elif any(resolved(pairs, p, value) != value for p in paths):
            raise ValueError(
                f"to_peft: `{pattern_name}` gives some targets another value, and PEFT's {method.peft_type} has one "
                f"`{names[0]}` for all"
            )
    if method.tensors_out is not None:
        tensors = method.tensors_out(tensors, cfg)
    if model is not None:
        cls = model_class(model)  # a model sharded by FSDP2: its own class, not FSDP's subclass
        fields["auto_mapping"] = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
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
    parameters = peft_parameters(model, fields, where)
    if not selection and not parameters:
        raise ValueError(f"{where}: `target_modules`={json.dumps(fields.get('target_modules'))} selects no module")
    method = next(m for m in candidates if m.claims(fields, selection, where))
    check_fields(fields, method, where)
    modules = dict(model.named_modules())
    for path in selection:
        kind = module_kind(modules[path])
        if kind is None or kind.name not in method.kinds:
            found = f"a {kind.name} layer" if kind is not None else "no layer kind lora_func adapts"
            raise ValueError(
                f"{where}: `target_modules` selects {path!r} ({type(modules[path]).__name__}), {found}; lora_func "
                f"reads PEFT's {method.peft_type} ({method.variant}) on {', '.join(method.kinds)} layers"
            )
    if fields.get("target_parameters") and not parameters:
        raise ValueError(
            f"{where}: `target_parameters`={json.dumps(fields['target_parameters'])} matches no parameter of "
            f"{type(model).__name__} (PEFT refuses it too)"
        )
    if parameters and "experts" not in method.kinds:
        raise ValueError(f"{where}: `target_parameters` is set, and lora_func reads it for PEFT's LoRA only")
    fan = fields.get("fan_in_fan_out", False)
    if not isinstance(fan, bool):  # PEFT decides per layer (Conv1D or not), as lora_func's kinds do
        raise ValueError(f"{where}: `fan_in_fan_out` must be true or false, got {json.dumps(fan)}")
    saved = peft_saved(model, fields, where)
    overlap = sorted(set(selection) & {p for p in modules if any(p == s or p.startswith(f"{s}.") for s in saved)})
    if overlap:
        raise ValueError(f"{where}: {overlap[0]!r} is both in `target_modules` and inside `modules_to_save`")
    kwargs: dict[str, Any] = {}
    for names, value, pattern in (
        (method.rank_fields, "r", "rank_pattern"),
        (method.alpha_fields, "alpha", "alpha_pattern"),
    ):
        if names is not None:
            if names[0] not in fields:
                raise ValueError(f"{where}: `{names[0]}` is missing")
            kwargs[value] = number(fields[names[0]], f"`{names[0]}`", where, rank=value == "r")
            if names[1] is not None:
                kwargs[pattern] = patterns_in(fields, names[1], where, rank=value == "r")
    targeting = targeting_config(fields, model) if selection else {"target_names": ()}
    try:
        cfg = REGISTRY[method.variant].config(
            **kwargs,
            **targeting,
            **method.fields_in(fields, where),
            target_parameters=tuple(parameters),
            modules_to_save=tuple(saved),
        )
    except (TypeError, ValueError) as e:
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where}: the config cannot be expressed in lora_func: {e}") from None
    return method, _exact_targets(cfg, model, selection, parameters), selection


def from_peft(directory: str | os.PathLike, model: nn.Module) -> Params:
    """Read a PEFT checkpoint directory (`adapter_model.safetensors` + `adapter_config.json`) as lora_func Params.

    `lf.apply(model, params, batch)` then computes what PEFT's `PeftModel.from_pretrained(model, directory)`
    does. Validated as strictly as `lf.load`: JSON with a key twice or NaN, a required field
    missing (`r`, `lora_alpha`, `target_modules`) or of the wrong type, a config field lora_func cannot honour, a
    module PEFT would adapt that lora_func does not, a key twice in the tensor header, missing or unexpected
    tensors, wrong shapes, NaN or infinite values: each an `lf.AdapterFileError` naming the file and the field,
    key or module. `model` is only read.

    The config's `target_names` select exactly the modules PEFT's `target_modules` (and `exclude_modules`,
    `layers_to_transform`) select in `model`, its `target_parameters` and `modules_to_save` exactly PEFT's.
    `lora_dropout` becomes `dropout`; `module_dropout` (DeLoRA) is accepted and dropped (it does nothing at
    inference). The leaves' dtype is the file's; they train as after `lf.init`. Frozen leaves PEFT does not store
    (DoRA's ‖W_i‖², HRA's u0, VeRA's projections saved with `save_projection=False`) are rebuilt as the module
    docstring says. A base embedding stored beside the adapter (PEFT's default `save_embedding_layers`) is read only
    where it is bitwise the model's own.

    >>> params = lf.from_peft("peft-adapter/", model)
    """
    try:
        return _from_peft(os.fspath(directory), model)
    except AdapterFileError:
        raise
    except ValueError as e:
        if not str(e).startswith("from_peft:"):
            raise
        raise AdapterFileError(str(e)) from None  # the method entries' refusals, of the same class as the rest


def _from_peft(directory: str, model: nn.Module) -> Params:
    where = f"from_peft: {os.path.join(directory, CONFIG_NAME)!r}"
    if not os.path.isdir(directory):
        raise AdapterFileError(f"from_peft: `directory` {directory!r} is not a directory")
    fields = read_config(directory)
    method, cfg, selection = config_from_peft(fields, model, where=where)
    variant = REGISTRY[method.variant]
    found = tuple(find_targets(model, cfg, caller="from_peft"))
    for target in found:
        check_kind(method, target, where)
    if method.check_model is not None:
        method.check_model(model, found, where)
    adapted = variant_targets(found)
    shared_stored = variant.create_shared is not None and method.shared_stored(fields)

    tensors = read_tensors(directory)
    where_weights = f"from_peft: {os.path.join(directory, WEIGHTS_NAME)!r}"
    if method.tensors_in is not None:
        tensors = method.tensors_in(tensors, fields, where_weights)
    keys: dict[str, dict[str, str]] = {}  # target path -> leaf -> its key in the file
    for target in found:
        if KINDS[target.kind].leaf_shapes is not None:
            keys[target.path] = {
                leaf: f"{KEY_PREFIX}{target.path}.{leaf}" for leaf in leaf_shapes(variant, target, cfg)
            }
        else:  # the leaves this target declares that PEFT stores (LoKr's are full or factored per target)
            try:
                declared = leaf_shapes(variant, target, cfg)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            keys[target.path] = {
                leaf: tensor_key(method, target, leaf, found) for leaf in declared if leaf in method.keys
            }
    expected = {key for leaves in keys.values() for key in leaves.values()}
    if shared_stored:
        expected |= set(method.shared_keys.values())
    _check_base_weights(tensors, found, model, where_weights)
    _check_derived(tensors, method, found, cfg, where_weights)
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{where_weights} has missing keys {missing[:5]} and unexpected keys {unexpected[:5]}")
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"{where_weights}: tensors must share one floating dtype, found {sorted(map(str, dtypes))}")
    cfg = dataclasses.replace(cfg, dtype=next(iter(dtypes)))

    entries: dict[str, dict[str, torch.Tensor]] = {}
    for target in found:
        site = site_for(model, target, cfg, "from_peft")
        try:
            shapes = leaf_shapes(variant, target, cfg)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        rank = f"r={site.config.r}, " if method.rank_fields is not None else ""
        stored = {leaf: tensors[key] for leaf, key in keys[target.path].items()}
        if method.target_in is not None:
            stored = method.target_in(fields, target, stored, where_weights)
        leaves = {}
        for leaf, raw in stored.items():
            key = keys[target.path].get(leaf, f"{target.path}.{leaf}")
            tensor = from_file(method, target, leaf, raw, tuple(shapes[leaf]))
            if tuple(tensor.shape) != tuple(shapes[leaf]):
                raise ValueError(
                    f"{where_weights} key {key!r} has shape {tuple(raw.shape)}, expected "
                    f"{stored_layout(method, target, leaf, shapes[leaf])} ({rank}{target.d_in} -> {target.d_out})"
                )
            leaves[leaf] = tensor
        if method.rebuild is not None and KINDS[target.kind].leaf_shapes is None:
            with torch.no_grad():
                leaves.update(method.rebuild(site.base, site.config, leaves))
        entries[target.path] = leaves
    if variant.create_shared is not None and adapted:
        shapes = variant.shared_shapes(adapted, cfg)
        if shared_stored:
            leaves = {}
            for leaf, key in method.shared_keys.items():
                tensor = method.tensor_in(leaf, tensors[key], tuple(shapes[leaf]))
                if tuple(tensor.shape) != tuple(shapes[leaf]):
                    raise ValueError(
                        f"{where_weights} key {key!r} has shape {tuple(tensors[key].shape)}, expected "
                        f"{tuple(shapes[leaf])} (shared by all {len(adapted)} targets)"
                    )
                leaves[leaf] = tensor
        else:
            leaves = variant.create_shared(adapted, cfg, Init(lambda: None, None))  # as `lf.init` draws them
        entries[SHARED] = leaves
    return assemble(cfg, found, entries, model, "from_peft")


def _check_derived(
    tensors: dict[str, torch.Tensor], method: PeftMethod, found: tuple, cfg: AdapterConfig, where: str
) -> None:
    """Read (and drop) the tensors PEFT stores that lora_func computes (`PeftMethod.derived`): each must be exactly
    what lora_func computes from the config, else lora_func would not compute what PEFT does."""
    for target in found if method.derived else ():
        for name, make in method.derived.items():
            key = f"{KEY_PREFIX}{target.path}.{name}"
            if key not in tensors:
                continue
            stored, want = tensors.pop(key), make(target, config_for(cfg, target.path))
            if stored.shape != want.shape or not torch.equal(stored.to(want.dtype), want):
                raise ValueError(
                    f"{where} key {key!r} is not what lora_func's {method.variant} computes from the config "
                    f"({method.peft_type} made with other settings or a custom function), which it cannot read"
                )


def _check_base_weights(tensors: dict[str, torch.Tensor], found: tuple, model: nn.Module, where: str) -> None:
    """PEFT's default save of a targeted embedding (`save_embedding_layers`) stores its base weight beside the
    adapter. lora_func never writes base weights: read (and drop) it where it is the model's own, bitwise; refuse
    it otherwise."""
    for target in found:
        key = base_weight_key(target)
        if key is None or key not in tensors:
            continue
        own = locate(model, target, "from_peft").module.weight.detach()
        stored = tensors.pop(key)
        if stored.shape != own.shape or not torch.equal(stored.to(own.device, own.dtype), own):
            raise ValueError(
                f"{where} key {key!r} holds a base weight of {target.path!r} (PEFT's `save_embedding_layers`) that "
                "differs from the model's: lora_func does not write base weights; load that weight into the model "
                "first, or save the PEFT adapter with `save_embedding_layers=False`"
            )


def _exact_targets(
    cfg: AdapterConfig, model: nn.Module, selection: list[str], parameters: list[str] = ()
) -> AdapterConfig:
    """`cfg` if it selects exactly `selection` (modules) and `parameters` in `model`, else the same config with
    one exact-path regex and no other filter."""

    def selects(config: AdapterConfig) -> bool:
        found = find_targets(model, config, caller="from_peft")
        modules = [t.path for t in found if t.kind not in ("experts", "saved")]
        return modules == selection and [t.path for t in found if t.kind == "experts"] == list(parameters)

    try:
        if selects(cfg):
            return cfg
    except ValueError:
        pass
    names = (f"^(?:{exact_regex(selection)})$",) if selection else ()
    exact = dataclasses.replace(cfg, target_names=names, exclude_names=(), layers=None, target_roles=None)
    if not selects(exact):
        raise RuntimeError(f"from_peft: internal error: no lora_func config selects exactly {selection[:3]}...")
    return exact
