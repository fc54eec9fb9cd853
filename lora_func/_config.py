"""The fields every adapter config shares, their validation, and their JSON form.

Validation is declared, not written per field: every field of a config class (its own and its subclass's) is
checked and normalised from its annotation (`bool` is a bool, `int` an int and not a bool, `float` a finite
number, `tuple[str, ...]` a tuple of strings, `X | None`, `torch.dtype`, `{pattern: value}` pairs), and `RULES`
adds the value constraints of the shared fields (r > 0, roles from `ROLES`, regexes that compile). A new field
is one annotated line in the class, plus one line in `RULES` if its values are constrained. Errors are
`ConfigError`s naming the field and the rule.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

ROLES = ("reader", "writer", "inner")


class ConfigError(ValueError, TypeError):
    """A config field of the wrong type or value; the message names the config class, the field and the rule.

    Both a ValueError and a TypeError, so that code catching either (for a bad value, for a wrong type) sees it.
    """


def _regexes(patterns: tuple[str, ...] | None) -> str | None:
    for pattern in patterns or ():
        try:
            re.compile(pattern)
        except re.error as e:
            return f"pattern {pattern!r} is not a regex: {e}"
    return None


def _pattern_rule(positive: bool) -> Callable[[tuple[tuple[str, Any], ...]], str | None]:
    def rule(pairs: tuple[tuple[str, Any], ...]) -> str | None:
        for pattern, value in pairs:
            error = _regexes((pattern,))
            if error:
                return error
            if positive and value <= 0:
                return f"value for {pattern!r} is invalid: {value!r} (must be a positive int)"
        return None

    return rule


def _dotted_names(names: tuple[str, ...], what: str) -> str | None:
    bad = next((n for n in names if not n or n.startswith(".") or n.endswith(".")), None)
    return None if bad is None else f"must hold {what} names (dotted paths), got {bad!r}"


# Value constraints beyond the annotation's type, by field name: value -> None, or what is wrong.
RULES: dict[str, Callable[[Any], str | None]] = {
    "r": lambda r: None if r > 0 else f"must be a positive int, got {r!r}",
    "target_roles": lambda roles: next((f"has {x!r}; roles are {ROLES}" for x in roles or () if x not in ROLES), None),
    "target_names": _regexes,
    "exclude_names": _regexes,
    "rank_pattern": _pattern_rule(positive=True),
    "alpha_pattern": _pattern_rule(positive=False),
    "target_parameters": lambda names: _dotted_names(names, "parameter"),
    "modules_to_save": lambda names: _dotted_names(names, "module"),
    "dropout": lambda p: None if 0 <= p < 1 else f"must be a number in [0, 1), got {p!r}",
}


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

    Every field is checked against its annotation (a bool is a bool, numbers are finite, lists become tuples)
    and `RULES`; a bad value is a `ConfigError` naming the field.
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
        owner = type(self).__name__
        for name, hint in field_types(type(self)).items():
            value = normalize(getattr(self, name), hint, name, owner)
            rule = RULES.get(name)
            problem = rule(value) if rule is not None else None
            if problem:
                raise ConfigError(f"{owner}: `{name}` {problem}")
            object.__setattr__(self, name, value)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """{field: its resolved annotation} for a config class (annotations are strings under `from __future__`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def describe(hint: Any) -> str:
    """What an annotation asks for, in words: `a tuple of strings or None`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        arms = " or ".join(describe(a) for a in args if a is not type(None))
        return arms + " or None" if type(None) in args else arms
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = typing.get_args(args[0])
        if typing.get_origin(args[0]) is tuple and len(item) == 2:
            return f"a mapping of regex strings to {describe(item[1]).split(' ', 1)[1]}s"
        return f"a tuple of {describe(args[0]).split(' ', 1)[1]}s"
    return {
        bool: "a bool",
        int: "an int",
        float: "a finite number",
        str: "a string",
        torch.dtype: "a torch floating dtype or its name",
    }.get(hint, repr(hint))


def normalize(value: Any, hint: Any, name: str, owner: str, *, stored: bool = False, label: str = "") -> Any:
    """`value` checked against the annotation `hint` and brought to its canonical form (lists -> tuples, ints ->
    floats for float fields, dtype names -> dtypes); a `ConfigError` naming `name` if it does not fit.

    `stored=True` reads a value from `config_to_json` output, which must have exactly that JSON form: sequences
    are lists (a bare string is not a one-element tuple), patterns are lists of pairs, dtypes are names.
    `label` replaces "`name`" in messages (a pattern's value: "`rank_pattern` value for 'q_proj'").
    """

    def wrong(detail: str = "") -> ConfigError:
        return ConfigError(f"{owner}: {label or f'`{name}`'} must be {describe(hint)}{detail}, got {value!r}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):  # the first arm it fits (`bool | str`: MiSS's init)
            try:
                return normalize(value, arm, name, owner, stored=stored)
            except ConfigError:
                continue
        raise wrong()
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = args[0]
        pairs = typing.get_origin(item) is tuple and len(typing.get_args(item)) == 2
        if pairs and isinstance(value, Mapping) and not stored:
            value = tuple(value.items())
        elif not stored and not pairs and isinstance(value, (str, int)) and not isinstance(value, bool):
            value = (value,)  # `target_names="q_proj$"`, `layers=3`
        if not isinstance(value, list if stored else (list, tuple)):
            raise wrong()
        each = label or ("" if pairs else f"each of `{name}`")
        return tuple(normalize(v, item, name, owner, stored=stored, label=each) for v in value)
    if origin is tuple:  # a fixed-length tuple: one (pattern, value) pair of `name`
        if not isinstance(value, list if stored else (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{owner}: `{name}` must map regex strings to values, got {value!r}")
        pattern = normalize(value[0], args[0], name, owner, stored=stored, label=f"`{name}` pattern")
        item = normalize(value[1], args[1], name, owner, stored=stored, label=f"`{name}` value for {pattern!r}")
        return pattern, item
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong(" (true or false)")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise wrong()
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise wrong()
        if not math.isfinite(value):
            raise wrong(" (not NaN or infinite)")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise wrong()
        return value
    if hint is torch.dtype:
        dtype = value if isinstance(value, torch.dtype) and not stored else None
        if isinstance(value, str):
            dtype = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise wrong(" (a floating dtype)")
        return dtype
    raise TypeError(f"{owner}: `{name}` has an annotation lora_func cannot check: {hint!r}")


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
    """The config as JSON: every field, dtype by name, tuples as lists."""
    fields = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        fields[f.name] = value
    return json.dumps(fields, sort_keys=True, allow_nan=False)


def strict_json(text: str, what: str) -> Any:
    """`json.loads`, refusing what Python's parser lets through: a key twice in an object (it would keep the last),
    and NaN / Infinity (not JSON; also a number too large for a float, which parses as infinity). A ValueError
    naming `what` and the key."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"{what} has the key {key!r} twice")
            out[key] = value
        return out

    def finite(value: Any, where: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            place = f"`{where}`" if where else "the top level"
            raise ValueError(f"{what} holds {value} at {place} (JSON numbers are finite)")
        if isinstance(value, dict):
            for key, item in value.items():
                finite(item, f"{where}.{key}" if where else key)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                finite(item, f"{where}[{i}]")

    try:
        value = json.loads(text, object_pairs_hook=unique)
        finite(value, "")
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None
    return value


def config_from_json(
    cls: type[AdapterConfig], text: str, *, where: str, added: Mapping[str, Any] | None = None
) -> AdapterConfig:
    """Rebuild `cls` from `config_to_json` output, strictly: JSON without duplicate keys or NaN, every field of
    `cls` present (`added`: fields the file's format version predates, with the value they take), none unknown,
    each in exactly the JSON form `config_to_json` writes. A ValueError naming the field."""
    try:
        fields = strict_json(text, "the stored config")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: the stored config is not a JSON object")
    added = added or {}
    types_ = field_types(cls)
    unknown = sorted(set(fields) - set(types_))
    if unknown:
        raise ValueError(f"{where}: the stored config has fields {unknown} that {cls.__name__} does not know")
    missing = sorted(set(types_) - set(fields) - set(added))
    if missing:
        raise ValueError(
            f"{where}: the stored config lacks fields {missing} of {cls.__name__}; lf.save writes every field, "
            "and a missing one is not given its default"
        )
    try:
        kwargs = {name: normalize(fields[name], types_[name], name, cls.__name__, stored=True) for name in fields}
        return cls(**kwargs, **{k: v for k, v in added.items() if k not in fields})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: the stored config is invalid: {e}") from None
