"""`save` / `load`: safetensors with the config, targets and versions in the metadata; loading is strict."""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ._config import AdapterConfig, config_from_json, config_to_json
from ._kind import Target
from ._params import SHARED, Params
from ._stack import stack_size
from ._version import __version__
from .kinds import declared_shapes, device_of, frozen_leaves, locate, target_from_json, target_to_json, variant_targets
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
        "targets": json.dumps([target_to_json(t) for t in params.targets]),
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
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: the stored target list is malformed ({e})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{where}: the stored target list is not a JSON list")
    found = tuple(target_from_json(row, where) for row in rows)
    if not found:
        raise ValueError(f"{where}: the stored target list is empty")
    return found


def expected_shapes(params_config: AdapterConfig, found: tuple[Target, ...]) -> dict[str, tuple[int, ...]]:
    """`<path>.<leaf>` -> shape for every leaf an adapter of this config and these targets has."""
    variant = variant_for(params_config, caller="load")
    shapes = {}
    for path, leaves in declared_shapes(variant, params_config, found).items():
        for leaf, shape in leaves.items():
            shapes[f"{path}.{leaf}"] = shape
    return shapes


def check_model(model: nn.Module, found: tuple[Target, ...], caller: str) -> None:
    """Every target exists in `model` as the kind and shape it was built for (`lora_func.kinds.locate`)."""
    for target in found:
        locate(model, target, caller)


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

    # Entries in the order `init` makes them (targets in order, each in its declaration's order, shared last),
    # leaves next to their base layer (shared ones with the first adapted target, as `init` puts them).
    by_path = {t.path: t for t in found}
    adapted = variant_targets(found)
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for entry, leaves in declared_shapes(variant, cfg, found).items():
        device = torch.device("cpu")
        if model is not None:
            device = device_of(locate(model, adapted[0] if entry == SHARED else by_path[entry], "load"))
        frozen = frozen_leaves(variant, entry, by_path)
        # A copy, not a view into the file's buffer: CPU BLAS results depend on the data's alignment,
        # and outputs must be bitwise those of the saved params.
        entries[entry] = {
            leaf: tensors[f"{entry}.{leaf}"].to(device, copy=True).requires_grad_(leaf not in frozen) for leaf in leaves
        }
    return Params(entries, cfg, found)
