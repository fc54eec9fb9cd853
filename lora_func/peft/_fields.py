"""The two files of a PEFT checkpoint: their names and keys, reading them, and checking the config's fields."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from .._config import strict_json
from .._serialize import AdapterFileError, read_safetensors
from ._method import REASONS, PeftMethod, refuse

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
KEY_PREFIX = "base_model.model."  # PEFT's prefix for the base model's module paths in the tensor file

# PeftConfig's own fields: descriptive, no effect on the adapted function.
METADATA = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision")
METADATA_INERT = ("inference_mode", "runtime_config")
# Fields of every PEFT method here that select modules: translated to `target_names`/`exclude_names`/`layers`.
TARGETING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")
# Fields every method here requires at their default (REASONS says why).
SHARED_REQUIRED = {"bias": "none", "modules_to_save": None}
# Fields about layer kinds, read for every method by `from_peft` (see `_kinds.py`) and written by `to_peft` in place of
# their defaults: `modules_to_save` (saved copies), `fan_in_fan_out` (PEFT's per-layer flag for transformers Conv1D),
# `target_parameters` (fused experts, for methods that have them).
KIND_FIELDS = ("modules_to_save", "fan_in_fan_out", "target_parameters")


def read_config(directory: str) -> dict[str, Any]:
    """`adapter_config.json`, strictly: JSON without a key twice or NaN/Infinity, an object."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise AdapterFileError(f"from_peft: {directory!r} has no {CONFIG_NAME}")
    where = f"from_peft: {path!r}"
    try:
        with open(path, encoding="utf-8") as f:
            fields = strict_json(f.read(), where)
    except UnicodeDecodeError as e:
        raise AdapterFileError(f"{where} is not JSON: {e}") from None
    except ValueError as e:
        raise AdapterFileError(str(e)) from None
    if not isinstance(fields, dict):
        raise AdapterFileError(f"{where} is not a JSON object")
    return fields


def read_tensors(directory: str) -> dict[str, torch.Tensor]:
    """`adapter_model.safetensors`, read as `lf.load` reads (no key twice in the header), each tensor finite."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        pickled = os.path.isfile(os.path.join(directory, "adapter_model.bin"))
        extra = " (adapter_model.bin is a pickle, which lora_func does not read)" if pickled else ""
        raise AdapterFileError(f"from_peft: {directory!r} has no {WEIGHTS_NAME}{extra}")
    where = f"from_peft: {path!r}"
    _, tensors = read_safetensors(path, where)
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{where} key {key!r} holds NaN or infinite values")
    # Copies, not views into the file's buffer: CPU BLAS results depend on the data's alignment, and a
    # round trip must give bitwise the outputs of the written params (as `lf.load`).
    return {key: tensor.clone() for key, tensor in tensors.items()}


def number(value: Any, label: str, where: str, *, rank: bool) -> int | float:
    """A PEFT rank (a positive int) or scale (a finite number); a bool is neither. `label` names it."""
    if rank and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise AdapterFileError(f"{where}: {label} is invalid: {json.dumps(value)} (must be a positive int)")
    if not rank and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise AdapterFileError(f"{where}: {label} is invalid: {json.dumps(value)} (must be a number)")
    return value


def check_fields(fields: Mapping[str, Any], method: PeftMethod, where: str) -> None:
    """Every field translated, inert, or at the only value lora_func can express; unknown ones must be unset."""
    translated = {*(method.rank_fields or ()), *(method.alpha_fields or ()), *TARGETING, *KIND_FIELDS, *method.handled}
    translated = translated - {None} - set(method.absent)
    required = {k: v for k, v in SHARED_REQUIRED.items() if k not in method.absent} | dict(method.required)
    for name, value in fields.items():
        if name in translated or name in METADATA or name in METADATA_INERT or name in method.inert:
            continue
        if name in required:
            default = required[name]
            if value != default and not (unset(default) and unset(value)):
                refuse(where, name, value, REASONS.get(name, f"lora_func reads only {json.dumps(default)}"))
        elif not unset(value):
            refuse(where, name, value, f"lora_func does not know this {method.peft_type} field, so cannot honour it")


def patterns_in(fields: Mapping[str, Any], name: str, where: str, *, rank: bool) -> tuple[tuple[str, Any], ...]:
    """PEFT's `{pattern: value}` (absent, null or {} for none), each value a rank or a scale (see `number`)."""
    value = fields.get(name)
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise AdapterFileError(f"{where}: `{name}` must be an object mapping patterns to values")
    return tuple((p, number(v, f"`{name}` value for {p!r}", where, rank=rank)) for p, v in value.items())


def unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, str)) and len(value) == 0)


def written(value: float) -> int | float:
    """An integral float as an int, as PEFT's configs write `lora_alpha=16`."""
    return int(value) if float(value).is_integer() else value


def pattern_pairs(pairs: tuple[tuple[str, Any], ...], sort: bool) -> tuple[tuple[str, Any], ...]:
    first: dict[str, Any] = {}
    for pattern, value in pairs:
        first.setdefault(pattern, value)  # a repeated pattern never wins after its first occurrence
    items = sorted(first.items()) if sort else list(first.items())
    return tuple(items)


def resolved(pairs: tuple[tuple[str, Any], ...], path: str, default: Any) -> Any:
    for pattern, value in pairs:
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def patterns_out(
    pairs: tuple[tuple[str, Any], ...], default: Any, paths: list[str], name: str, caller: str
) -> dict[str, Any]:
    """`pairs` as PEFT's JSON dict. PEFT writes it with sorted keys and takes the first match in that order, so
    where sorting would change which pattern wins for some target, write one exact pattern per target instead."""
    want = {p: resolved(pairs, p, default) for p in paths}
    out = pattern_pairs(pairs, sort=True)
    if any(resolved(out, p, default) != want[p] for p in paths):
        out = tuple(sorted((re.escape(p), v) for p, v in want.items() if v != default))
        if any(resolved(out, p, default) != want[p] for p in paths):
            raise ValueError(f"{caller}: `{name}` cannot be written so that PEFT resolves it as lora_func does")
    return {pattern: value for pattern, value in out}
