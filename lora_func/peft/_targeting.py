"""PEFT's module selection (`target_modules`, `exclude_modules`, `layers_to_transform`) and its lora_func twin.

`peft_selection` computes the modules PEFT adapts with PEFT's own matching rules; `targeting_config` translates
the fields to lora_func's `target_names`/`exclude_names`/`layers` regexes (re.search); `exact_regex` and
`target_modules_out` go the other way, for `to_peft`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from torch import nn

ALL_LINEAR = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")  # PEFT's heads left out of "all-linear" for SEQ_CLS models


def layer_index(key: str, layers_pattern: Any) -> int | None:
    """The layer index PEFT reads from a module path (`check_target_module_exists`): the first numbered segment."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def all_linear(model: nn.Module, task_type: Any) -> list[str]:
    """PEFT's "all-linear": every nn.Linear and transformers Conv1D but the output layer (or the SEQ_CLS head)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    excluded: set[str] = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None and task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None)
    if head is not None:
        excluded |= {name for name, m in model.named_modules() if m is head}
    return [n for n in names if n not in excluded]


def peft_selection(model: nn.Module, fields: Mapping[str, Any], where: str) -> list[str]:
    """The module paths PEFT adapts for these config fields (`BaseTuner.inject_adapter`), in `named_modules` order."""
    target_modules = fields.get("target_modules")
    exclude = fields.get("exclude_modules")
    layers = fields.get("layers_to_transform")
    layers_pattern = fields.get("layers_pattern")
    if target_modules is None:
        raise ValueError(f"{where}: `target_modules` is null; lora_func needs the adapted modules named")
    if not isinstance(target_modules, (str, list)) or (
        isinstance(target_modules, list) and not all(isinstance(t, str) for t in target_modules)
    ):
        raise ValueError(f"{where}: `target_modules` must be a regex string or a list of names")
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        target_modules = all_linear(model, fields.get("task_type"))
    if isinstance(target_modules, str) and layers is not None:
        raise ValueError(f"{where}: `layers_to_transform` needs a list `target_modules`, not a regex (as in PEFT)")
    if layers_pattern and layers is None:
        raise ValueError(f"{where}: `layers_pattern` needs `layers_to_transform` (as in PEFT)")
    if layers is not None and not (
        isinstance(layers, int) or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))
    ):
        raise ValueError(f"{where}: `layers_to_transform` must be an int or a list of ints, got {json.dumps(layers)}")
    use_layers = layers is not None and (layers != [] if isinstance(layers, list) else True)

    def excluded(key: str) -> bool:
        if not exclude:
            return False
        if isinstance(exclude, str):
            return re.fullmatch(exclude, key) is not None
        return key in exclude or any(key.endswith(f".{e}") for e in exclude)

    selected = []
    for key, _ in model.named_modules():
        if not key or excluded(key):
            continue
        if isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, key) is not None
        else:
            hit = key in target_modules or any(key.endswith(f".{t}") for t in target_modules)
            if hit and use_layers:
                index = layer_index(key, layers_pattern)
                hit = index is not None and (index == layers if isinstance(layers, int) else index in layers)
        if hit:
            selected.append(key)
    return selected


def alternation(items: list[str]) -> str:
    escaped = [re.escape(i) for i in items]
    return escaped[0] if len(escaped) == 1 else "(?:" + "|".join(escaped) + ")"


def exact_regex(paths: list[str]) -> str:
    """A regex that fully matches exactly `paths`, compact where they repeat across layers:
    `model\\.layers\\.(?:0|1)\\.(?:mlp\\.up_proj|self_attn\\.q_proj)`."""
    by_template: dict[tuple[str, str], set[str]] = {}
    plain: list[str] = []
    for path in paths:
        match = re.search(r"\.(\d+)\.", path)
        if match is None:
            plain.append(path)
            continue
        prefix, index, suffix = path[: match.start()], match.group(1), path[match.end() :]
        by_template.setdefault((prefix, suffix), set()).add(index)
    grouped: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for (prefix, suffix), indices in by_template.items():
        grouped.setdefault((prefix, tuple(sorted(indices, key=int))), []).append(suffix)
    parts = [
        rf"{re.escape(prefix)}\.{alternation(list(indices))}\.{alternation(sorted(suffixes))}"
        for (prefix, indices), suffixes in sorted(grouped.items())
    ]
    parts += [re.escape(p) for p in sorted(plain)]
    return parts[0] if len(parts) == 1 else "|".join(parts)


def targeting_config(fields: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """PEFT's targeting fields as lora_func `target_names`/`exclude_names`/`layers` (regex, re.search)."""
    target_modules = fields["target_modules"]
    exclude = fields.get("exclude_modules")
    layers = fields.get("layers_to_transform")

    def suffixes(names: list[str]) -> str:
        return rf"(?:^|\.)(?:{exact_regex(sorted(set(names)))})$"

    out: dict[str, Any] = {"target_names": None, "exclude_names": (), "layers": None}
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        chosen = set(all_linear(model, fields.get("task_type")))
        left_out = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in chosen]
        out["exclude_names"] = tuple(f"^{re.escape(n)}$" for n in left_out)
    elif isinstance(target_modules, str):
        out["target_names"] = (f"^(?:{target_modules})$",)
    else:
        out["target_names"] = (suffixes(target_modules),)
    if isinstance(exclude, str) and exclude:
        out["exclude_names"] += (f"^(?:{exclude})$",)
    elif exclude:
        out["exclude_names"] += (suffixes(exclude),)
    if layers is not None and layers != []:
        out["layers"] = (layers,) if isinstance(layers, int) else tuple(layers)
    return out


def target_modules_out(paths: list[str], model: nn.Module | None) -> str | list[str]:
    if model is not None:
        names = sorted({p.rsplit(".", 1)[-1] for p in paths})
        if peft_selection(model, {"target_modules": names}, "to_peft") == paths:
            return names
    return exact_regex(paths)
