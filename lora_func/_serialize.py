"""`save` / `load`: safetensors with the config, targets and versions in the metadata; loading is strict."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ._config import AdapterConfig, config_for, config_from_json, config_to_json
from ._params import SHARED, Params
from ._stack import stack_size
from ._targets import Target, is_linear_like
from ._version import __version__
from .variants import REGISTRY, variant_for

FORMAT = "lora_func"
FORMAT_VERSION = "1"


def save(params: Params, path: str | os.PathLike) -> None:
    """Write `params` to a safetensors file: keys `<module path>.<leaf>`, config and targets in the metadata.

    >>> lf.save(params, "adapter.safetensors")
    """
    if not isinstance(params, Params):
        raise TypeError(f"save: `params` must be lora_func Params, got {type(params).__name__}")
    variant = variant_for(params.config, caller="save")
    count = stack_size(params, "save")
    if count is not None:  # `load` reads one adapter
        raise ValueError(f"save: `params` stacks {count} adapters; save each of lf.unstack(params)")
    for p, leaf, t in params.leaves():  # a file `load` would refuse is not written
        if t.dtype != params.config.dtype:
            raise ValueError(f"save: leaf {p}.{leaf} has dtype {t.dtype}, the config says {params.config.dtype}")
    tensors = {f"{p}.{leaf}": t.detach().to("cpu").contiguous() for p, leaf, t in params.leaves()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "variant": variant.name,
        "config": config_to_json(params.config),
        "targets": json.dumps([asdict(t) for t in params.targets]),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def _read(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"load: {path!r} is not a valid safetensors file ({e})") from None
    return metadata, tensors


def _parse_targets(text: str, where: str) -> tuple[Target, ...]:
    try:
        rows = json.loads(text)
        found = tuple(Target(r["path"], int(r["d_in"]), int(r["d_out"]), tuple(r["roles"]), r["kind"]) for r in rows)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: the stored target list is malformed ({e})") from None
    if not found:
        raise ValueError(f"{where}: the stored target list is empty")
    return found


def expected_shapes(params_config: AdapterConfig, found: tuple[Target, ...]) -> dict[str, tuple[int, ...]]:
    """`<path>.<leaf>` -> shape for every leaf an adapter of this config and these targets has."""
    variant = variant_for(params_config, caller="load")
    shapes = {}
    for target in found:
        for leaf, shape in variant.shapes(target, config_for(params_config, target.path)).items():
            shapes[f"{target.path}.{leaf}"] = tuple(shape)
    if variant.shared_shapes is not None:
        for leaf, shape in variant.shared_shapes(found, params_config).items():
            shapes[f"{SHARED}.{leaf}"] = tuple(shape)
    return shapes


def check_model(model: nn.Module, found: tuple[Target, ...], caller: str) -> None:
    modules = dict(model.named_modules())
    for target in found:
        module = modules.get(target.path)
        if module is None:
            raise ValueError(f"{caller}: target {target.path!r} is not a module of {type(model).__name__}")
        if not is_linear_like(module):
            raise ValueError(f"{caller}: target {target.path!r} is a {type(module).__name__}, not linear-like")
        if (module.in_features, module.out_features) != (target.d_in, target.d_out):
            raise ValueError(
                f"{caller}: target {target.path!r} is {module.in_features} -> {module.out_features} in the model, "
                f"the adapter holds {target.d_in} -> {target.d_out}"
            )


def load(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    config: AdapterConfig | type[AdapterConfig] | None = None,
) -> Params:
    """Read an adapter written by `save`, validating every key, shape, dtype and the config.

    With `model`, every target must exist there with the same shape, and leaves are moved to its
    device. With `config` (an instance or a config class), the stored config must match it.

    >>> params = lf.load("adapter.safetensors", model)
    """
    path = os.fspath(path)
    metadata, tensors = _read(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"load: {path!r} is a safetensors file but not a lora_func adapter (no lora_func metadata)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"load: {path!r} has format_version {metadata.get('format_version')!r}; "
            f"this library reads {FORMAT_VERSION!r}"
        )
    name = metadata.get("variant")
    if name not in REGISTRY:
        raise ValueError(f"load: {path!r} holds variant {name!r}, which is not one of {sorted(REGISTRY)}")
    variant = REGISTRY[name]
    cfg = config_from_json(variant.config, metadata.get("config", ""), where=f"load: {path!r}")
    if isinstance(config, type) and config is not type(cfg) or isinstance(config, AdapterConfig) and config != cfg:
        want = config.__name__ if isinstance(config, type) else repr(config)
        raise ValueError(f"load: {path!r} holds {cfg!r}, expected {want}")
    found = _parse_targets(metadata.get("targets", ""), f"load: {path!r}")
    if model is not None:
        check_model(model, found, f"load: {path!r}")

    shapes = expected_shapes(cfg, found)
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"load: {path!r} has missing keys {missing[:5]} and unexpected keys {unexpected[:5]}")
    for key, shape in shapes.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"load: {path!r} key {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
        if tensor.dtype != cfg.dtype:
            raise ValueError(f"load: {path!r} key {key!r} has dtype {tensor.dtype}, the config says {cfg.dtype}")

    entries: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        path, leaf = key.rsplit(".", 1)
        device = torch.device("cpu")
        if model is not None:  # shared leaves sit with the first target, as `init` puts them
            device = model.get_submodule(found[0].path if path == SHARED else path).weight.device
        # A copy, not a view into the file's buffer: CPU BLAS results depend on the data's alignment,
        # and outputs must be bitwise those of the saved params.
        tensor = tensor.to(device, copy=True)
        entries.setdefault(path, {})[leaf] = tensor.requires_grad_(leaf not in variant.frozen)
    # Leaf order as `init` makes it: targets in order, each in its variant's order, shared last.
    order = [t.path for t in found] + ([SHARED] if SHARED in entries else [])
    shapes_of = {t.path: variant.shapes(t, config_for(cfg, t.path)) for t in found}
    if SHARED in entries:
        shapes_of[SHARED] = variant.shared_shapes(found, cfg)
    entries = {p: {leaf: entries[p][leaf] for leaf in shapes_of[p]} for p in order}
    return Params(entries, cfg, found)
