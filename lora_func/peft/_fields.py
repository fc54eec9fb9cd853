"""The two files of a PEFT checkpoint: their names and keys, reading them, and checking the config's fields."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

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


def read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"from_peft: {directory!r} has no {CONFIG_NAME}")
    try:
        with open(path) as f:
            fields = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"from_peft: {path!r} is not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"from_peft: {path!r} is not a JSON object")
    return fields


def read_tensors(directory: str) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        pickled = os.path.isfile(os.path.join(directory, "adapter_model.bin"))
        extra = " (adapter_model.bin is a pickle, which lora_func does not read)" if pickled else ""
        raise ValueError(f"from_peft: {directory!r} has no {WEIGHTS_NAME}{extra}")
    try:
        with safe_open(path, framework="pt") as f:
            # Copies, not views into the file's buffer: CPU BLAS results depend on the data's alignment, and a
            # round trip must give bitwise the outputs of the written params (as `lf.load`).
            return {key: f.get_tensor(key).clone() for key in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"from_peft: {path!r} is not a valid safetensors file ({e})") from None


def check_fields(fields: Mapping[str, Any], method: PeftMethod, where: str) -> None:
    """Every field translated, inert, or at the only value lora_func can express; unknown ones must be unset."""
    translated = {*(method.rank_fields or ()), *(method.alpha_fields or ()), *TARGETING, *method.handled}
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


def patterns_in(fields: Mapping[str, Any], name: str, where: str) -> tuple[tuple[str, Any], ...]:
    value = fields.get(name) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: `{name}` must be an object mapping patterns to values")
    return tuple(value.items())


def unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, str)) and len(value) == 0)


def number(value: float) -> int | float:
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
