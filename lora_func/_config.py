"""The fields every adapter config shares, their validation, and their JSON form."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import torch

ROLES = ("reader", "writer", "inner")


def _as_tuple(value: Any, field: str) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, (str, int)):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise TypeError(f"`{field}` must be a sequence or None, got {type(value).__name__}") from None


def _as_dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise ValueError(f"`dtype` must be a torch floating dtype or its name, got {value!r}")


@dataclass(frozen=True)
class AdapterConfig:
    """Fields shared by every variant.

    r: rank (or number of reflections/blocks, per variant).
    alpha: scale numerator; the adapter scale is `alpha / r` unless the variant says otherwise.
    dtype: dtype of the adapter leaves.
    target_roles: keep targets with any of these roles ("reader", "writer", "inner"); None keeps all.
    target_names: regexes; a target's path must match at least one (re.search). None keeps all.
    exclude_names: regexes; a target whose path matches any is dropped.
    layers: keep only targets inside block i of the model, for these i: the first numbered segment
        `.layers.<i>.`, `.layer.<i>.` (BERT), `.h.<i>.` (GPT-2), `.block.<i>.` (T5), `.blocks.<i>.` of the path,
        so a sub-layer index inside a block (T5's `block.<i>.layer.<j>`) never counts.
    target_parameters: names of 3-D expert parameters of fused MoE layers to adapt (PEFT's `target_parameters`):
        a parameter is selected when its name in `named_parameters()` is one of these or ends with "." + one.
        Module targets are chosen as before; `target_names=()` adapts the parameters alone.
    modules_to_save: names of modules trained as full copies held in the adapter (PEFT's `modules_to_save`,
        e.g. a new classifier head): a module is selected when its path is one of these or ends with "." + one.
        Its parameters (and those of its submodules) become trainable leaves; it is not adapted otherwise.
    rank_pattern, alpha_pattern: per-target `r` / `alpha` overrides, `{pattern: value}` matched as PEFT does
        (the path ends with a match of the pattern, starting at a dot boundary, as PEFT's `get_pattern_key`);
        variants see each target's resolved config (`config_for`).
    """

    r: int = 8
    alpha: float = 16.0
    dtype: torch.dtype = torch.float32
    target_roles: tuple[str, ...] | None = None
    target_names: tuple[str, ...] | None = None
    exclude_names: tuple[str, ...] = ("lm_head", "embed_tokens")
    layers: tuple[int, ...] | None = None
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    target_parameters: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"{name}: `r` must be a positive int, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise TypeError(f"{name}: `alpha` must be a number, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        dtype = _as_dtype(self.dtype)
        if not dtype.is_floating_point:
            raise ValueError(f"{name}: `dtype` must be a floating dtype, got {dtype}")
        object.__setattr__(self, "dtype", dtype)
        for field in ("target_roles", "target_names", "exclude_names", "layers"):
            object.__setattr__(self, field, _as_tuple(getattr(self, field), field))
        if self.exclude_names is None:
            object.__setattr__(self, "exclude_names", ())
        for field in ("target_parameters", "modules_to_save"):
            names = _as_tuple(getattr(self, field), field) or ()
            for item in names:
                if not isinstance(item, str) or not item or item.startswith(".") or item.endswith("."):
                    raise ValueError(f"{name}: `{field}` must hold module or parameter names, got {item!r}")
            object.__setattr__(self, field, names)
        for role in self.target_roles or ():
            if role not in ROLES:
                raise ValueError(f"{name}: `target_roles` has {role!r}; roles are {ROLES}")
        for field in ("target_names", "exclude_names"):
            for pattern in getattr(self, field) or ():
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as e:
                    raise ValueError(f"{name}: `{field}` pattern {pattern!r} is not a regex: {e}") from None
        for index in self.layers or ():
            if isinstance(index, bool) or not isinstance(index, int):
                raise ValueError(f"{name}: `layers` must hold ints, got {index!r}")
        for field, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            pairs = _as_pairs(getattr(self, field), field, name)
            for pattern, value in pairs:
                if isinstance(value, bool) or not isinstance(value, kind) or (field == "rank_pattern" and value <= 0):
                    raise ValueError(f"{name}: `{field}` value for {pattern!r} is invalid: {value!r}")
            if field == "alpha_pattern":
                pairs = tuple((p, float(v)) for p, v in pairs)
            object.__setattr__(self, field, pairs)


def _as_pairs(value: Any, field: str, name: str) -> tuple[tuple[str, Any], ...]:
    """`{pattern: value}` or pairs, as a hashable tuple of pairs."""
    items = value.items() if isinstance(value, dict) else value or ()
    pairs = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"{name}: `{field}` must map regex strings to values, got {item!r}")
        try:
            re.compile(item[0])
        except re.error as e:
            raise ValueError(f"{name}: `{field}` pattern {item[0]!r} is not a regex: {e}") from None
        pairs.append((item[0], item[1]))
    return tuple(pairs)


def _pattern_value(pairs: tuple[tuple[str, Any], ...], path: str, default: Any) -> Any:
    for pattern, value in pairs:
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


@functools.lru_cache(maxsize=4096)
def config_for(cfg: AdapterConfig, path: str) -> AdapterConfig:
    """The config a variant sees for one target: `r` and `alpha` resolved from the patterns."""
    if not cfg.rank_pattern and not cfg.alpha_pattern:
        return cfg
    r = _pattern_value(cfg.rank_pattern, path, cfg.r)
    alpha = _pattern_value(cfg.alpha_pattern, path, cfg.alpha)
    return dataclasses.replace(cfg, r=r, alpha=alpha, rank_pattern=(), alpha_pattern=())


def config_to_json(cfg: AdapterConfig) -> str:
    """The config as JSON: dtype by name, tuples as lists."""
    fields = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        fields[f.name] = value
    return json.dumps(fields, sort_keys=True)


def config_from_json(cls: type[AdapterConfig], text: str, *, where: str) -> AdapterConfig:
    """Rebuild `cls` from `config_to_json` output; unknown or bad fields name themselves."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: the stored config is not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: the stored config is not a JSON object")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{where}: the stored config has fields {unknown} that {cls.__name__} does not know")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: the stored config is invalid: {e}") from None
