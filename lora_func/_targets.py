"""Which layers an adapter config selects: modules of a registered kind (`lora_func/kinds/`), expert
parameters (`target_parameters`) and saved modules (`modules_to_save`), with the role, name and block filters."""

from __future__ import annotations

import re
from collections import Counter

from torch import nn

from ._config import AdapterConfig
from ._kind import Kind, Target
from .kinds import KINDS, module_kind, require_support
from .variants import variant_for

# A block of the model: the first numbered segment of these names (`model.layers.3`, `transformer.h.3`,
# `encoder.layer.3`, `encoder.block.3`, `blocks.3`). The first, so that T5's `block.3.layer.1` is block 3.
_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)(?:\.|$)")


def model_width(model: nn.Module) -> int | None:
    """d_model: `config.hidden_size` (or the text config's) where present, else the most common `in_features`."""
    config = getattr(model, "config", None)
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        width = getattr(text_config, "hidden_size", None)
        if isinstance(width, int):
            return width
    widths = Counter(m.in_features for m in model.modules() if KINDS["linear"].recognise(m))
    return widths.most_common(1)[0][0] if widths else None


def roles_of(d_in: int, d_out: int, width: int | None) -> tuple[str, ...]:
    roles = tuple(role for role, hit in (("reader", d_in == width), ("writer", d_out == width)) if hit)
    return roles or ("inner",)


def layer_index(path: str) -> int | None:
    """The index of the block `path` lies in (see `_BLOCK_INDEX`), or None outside any block."""
    match = _BLOCK_INDEX.search(path)
    return int(match.group(1)) if match else None


def _names(path: str, names: tuple[str, ...]) -> bool:
    """PEFT's name match with a dot boundary: `path` is one of `names` or ends with "." + one."""
    return any(path == n or path.endswith(f".{n}") for n in names)


def find_targets(model: nn.Module, cfg: AdapterConfig, *, caller: str = "targets") -> list[Target]:
    """The targets `cfg` selects in `model`, in `named_modules` order (a module's parameter targets right after
    it, saved modules where they are). Selecting nothing is an error; so is a variant asked to adapt a kind it
    does not support.

    A module is a target when a registered kind recognises it and `target_names` matches its path (or, with
    `target_names` None, when its kind is targeted by default: linear-like layers), it is not excluded, lies in
    one of `layers`, and has one of `target_roles`. A module whose parent reads its weight without calling it
    (`nn.MultiheadAttention.out_proj`) is never a target: an adapter there would have no effect; the default
    selection passes over it, and `target_names` selecting it is an error naming it. Expert parameters come from
    `target_parameters`, under the same filters. The modules of `modules_to_save` (and everything inside them) are
    saved, not adapted.
    """
    variant = variant_for(cfg, caller=caller)
    width = model_width(model)

    def roles(d_in: int, d_out: int) -> tuple[str, ...]:
        return roles_of(d_in, d_out, width)

    def adaptable(module: nn.Module) -> Kind | None:
        kind = module_kind(module)
        return None if kind is not None and kind.listed_only and kind.name not in variant.kinds else kind

    def kept(path: str, target: Target) -> bool:
        if any(re.search(p, path) for p in cfg.exclude_names):
            return False
        if cfg.layers is not None and layer_index(path) not in cfg.layers:
            return False
        return cfg.target_roles is None or bool(set(cfg.target_roles) & set(target.roles))

    # With `target_names` None: the linear-like layers, or for a variant that adapts none (LN Tuning, Trainable
    # Tokens), every layer of the kinds it lists.
    default_kinds = {n for n, k in KINDS.items() if k.by_default}
    if not default_kinds & set(variant.kinds):
        default_kinds = set(variant.kinds)
    unread = read_not_called(model)
    saved_roots = [p for p, _ in model.named_modules() if cfg.modules_to_save and _names(p, cfg.modules_to_save)]
    selected: list[Target] = []
    name_hits: dict[str, list[str]] = {p: [] for p in cfg.target_names or ()}
    parameter_hits: dict[str, list[str]] = {n: [] for n in cfg.target_parameters}
    for path, module in model.named_modules():  # the root too: a bare nn.Linear is a model with one target
        if any(path == root or path.startswith(f"{root}.") for root in saved_roots):
            if any(True for _ in module.parameters(recurse=False)):
                selected.append(KINDS["saved"].describe(path, module, roles))
            continue
        kind = adaptable(module)
        if cfg.target_names is None:
            wanted = kind is not None and kind.name in default_kinds
        else:
            matched = [p for p in cfg.target_names if re.search(p, path)]
            for p in matched:
                name_hits[p].append(path)
            wanted = bool(matched) and kind is not None
        if wanted:
            target = kind.describe(path, module, roles)
            if kept(path, target):
                if path in unread and cfg.target_names is not None:
                    raise ValueError(
                        f"{caller}: `target_names` selects {path!r}, which its model never calls: {unread[path]}. "
                        "An adapter there would get no gradient and have no effect; leave it out (`exclude_names`)"
                    )
                if path not in unread:
                    selected.append(target)
        for name, _ in module.named_parameters(recurse=False):
            key = f"{path}.{name}" if path else name
            hits = [n for n in cfg.target_parameters if key == n or key.endswith(f".{n}")]
            for n in hits:
                parameter_hits[n].append(key)
            if hits:
                target = KINDS["experts"].describe(key, module, roles)
                if kept(key, target):
                    selected.append(target)

    modules = dict(model.named_modules())
    for pattern, paths in name_hits.items():  # a pattern that hits only modules no kind adapts is a mistake
        if paths and not any(adaptable(modules[p]) is not None for p in paths):
            shown = ", ".join(f"{p} ({type(modules[p]).__name__})" for p in paths[:3])
            raise ValueError(
                f"{caller}: `target_names` pattern {pattern!r} matches only modules that no layer kind adapts "
                f"({', '.join(sorted(k for k, v in KINDS.items() if v.recognise is not None))}): {shown}"
            )
    for name, keys in parameter_hits.items():
        if not keys:
            raise ValueError(
                f"{caller}: `target_parameters` name {name!r} matches no parameter of {type(model).__name__}"
            )
    for name in cfg.modules_to_save:
        roots = [p for p in modules if _names(p, (name,))]
        if not any(True for p in roots for _ in modules[p].parameters()):
            raise ValueError(
                f"{caller}: `modules_to_save` name {name!r} matches no module of {type(model).__name__} "
                "that has parameters"
            )
    _refuse_tied(model, [t for t in selected if t.kind == "saved"], caller)
    # `target_names=()` asks for no module targets (expert parameters or saved modules alone).
    if not selected or cfg.target_names != () and not any(t.kind != "saved" for t in selected):
        raise ValueError(
            f"{caller}: {type(cfg).__name__} selects no module of {type(model).__name__} "
            f"(target_roles={cfg.target_roles}, target_names={cfg.target_names}, "
            f"exclude_names={cfg.exclude_names}, layers={cfg.layers}, target_parameters={cfg.target_parameters}, "
            f"d_model={width})"
        )
    for target in selected:
        require_support(variant, target, cfg)
    return selected


def read_not_called(model: nn.Module) -> dict[str, str]:
    """{path: why} of the modules whose parent reads their weight without calling them, so that no hook on them
    runs: `nn.MultiheadAttention` passes `out_proj.weight` to `F.multi_head_attention_forward` (its fast path
    too), as PEFT's `MultiheadAttention` layer notes."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and isinstance(module.out_proj, nn.Module):
            child = f"{path}.out_proj" if path else "out_proj"
            found[child] = f"nn.MultiheadAttention {path or type(model).__name__!r} reads `out_proj.weight` itself"
    return found


def _refuse_tied(model: nn.Module, saved: list[Target], caller: str) -> None:
    """A saved module whose parameter is shared with another module (tied embeddings) would carry the other along."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for target in saved:
        module = model.get_submodule(target.path)
        for name, p in module.named_parameters(recurse=False):
            if len(owners[id(p)]) > 1:
                raise ValueError(
                    f"{caller}: `modules_to_save` copies {target.path}.{name}, which the model ties to "
                    f"{[o for o in owners[id(p)] if o != f'{target.path}.{name}']}: the copy would replace them too"
                )
