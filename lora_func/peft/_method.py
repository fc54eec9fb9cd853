"""One PEFT method as lora_func reads and writes it: the `PeftMethod` record, and the helpers entries share."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .._config import AdapterConfig
from .._kind import BaseLayer, Target
from .._params import Params
from .._variant import Leaves

Tensors = dict[str, torch.Tensor]  # one target's tensors by leaf

# Why a PEFT field lora_func cannot honour is refused (at any value but its default).
REASONS = {
    "bias": "lora_func adapters hold no bias terms",
    "use_dora": "lora_func reads DoRA with a plain LoRA init only (its PiSSA and DoRA are separate variants)",
    "apply_GS": "lora_func's HRA does not offer Gram-Schmidt (R = I − 2QQᵀ is never the identity at init)",
    "lora_bias": "lora_func adapters hold no bias terms",
    "layer_replication": "lora_func does not duplicate layers",
    "trainable_token_indices": "lora_func does not train embedding rows",
    "ensure_weight_tying": "lora_func does not tie adapters across modules",
    "init_lora_weights": "that initialisation rewrites the base weights, which the checkpoint does not hold; "
    "convert it to a plain LoRA with PEFT's `path_initial_model_for_weight_conversion` first",
}


def claims_any(fields: Mapping[str, Any], paths: list[str], where: str) -> bool:
    """The default `claims`: every config of the entry's `peft_type` (tried after the entries that claim some)."""
    return True


@dataclass(frozen=True)
class PeftMethod:
    """How one lora_func variant reads and writes as one PEFT method.

    variant, peft_type: the lora_func variant name and PEFT's `peft_type`.
    keys: lora_func leaf -> PEFT tensor name after the module path ("A" -> "lora_A.weight"). A leaf not in `keys`
        is not written; `rebuild` makes it on import.
    rank_fields: the PEFT fields holding `r` and `rank_pattern` (the latter None where PEFT has one rank for all
        targets: HRA, VeRA); None for a method without a rank (IA3).
    alpha_fields: the PEFT fields holding `alpha` and `alpha_pattern` (DeLoRA: its λ); None: no such field.
    required: PEFT fields lora_func can express only at this value (written on export, checked on import).
    inert: PEFT fields accepted with any value on import (no effect on the adapted function at inference),
        with the value written on export.
    absent: fields of `TARGETING` and `SHARED_REQUIRED` that this PEFT config class does not have (IA3 has no
        `layers_to_transform`): not written, and on import refused unless unset, as any unknown field.
    fields_out(cfg, written) -> {field: value}: method-specific fields written on export; `written` holds the
        common fields already chosen (IA3-FF copies `target_modules` into `feedforward_modules`).
    fields_in(fields, where) -> {config kwarg: value}: method-specific config kwargs on import; may raise.
    handled: the PEFT fields that `fields_in` (or `claims`, `shared_stored`) reads.
    claims(fields, paths, where): whether this entry reads a PEFT config of this `peft_type` whose targets are
        `paths` (several entries may share one); may raise where no entry of the type can read it.
    export_as(params) -> params: checked, or rewritten as another variant's params, before writing (PiSSA -> LoRA).
    rebuild(module, cfg, leaves) -> leaves: leaves the PEFT file does not hold, from the base layer and the leaves
        read from the file.
    tensor_out(leaf, tensor) -> tensor, tensor_in(leaf, tensor, shape) -> tensor: layout changes between a
        lora_func leaf and its PEFT tensor (e.g. IA3's (d,) vector stored as (d, 1)); identity by default.
        `tensor_in` returns the tensor unchanged where it cannot reach `shape`, and the shape check reports it.
    shared_keys: leaf of the shared entry (`SHARED`) -> its full PEFT tensor key (VeRA: "A" -> "base_model.vera_A").
    shared_stored(fields): whether an imported file holds the shared leaves; where not, they are made as `lf.init`
        makes them (the variant's `create_shared`).
    derived: PEFT tensor name after the module path -> `make(target, cfg)`, cfg the target's resolved config: tensors
        PEFT stores per target that are no leaves, lora_func computing them from the config and the target's shape
        (SHiRA's mask indices). Written on export; on import each must be what `make` gives, or the file is refused
        (an absent one is what PEFT computes from the config too).
    kinds: the layer kinds (`lora_func/kinds/`) PEFT's method adapts as lora_func's variant does (`_kinds.py`).
    conv_dims: with "conv" in `kinds`, the convolutions PEFT's method has a layer for (1: nn.Conv1d, ...).
    conv_dilation: whether PEFT's conv layer convolves with the layer's dilation (AdaLoRA's `SVDConv2d`); where not
        (LoRA's conv A), dilated convolutions are refused.
    check_model(model, targets, where): raises where PEFT's method would compute something else on this model
        (Trainable Tokens on an embedding tied to the output head); run by `from_peft`, and by `to_peft` with `model`.
    leaf_fields(params) -> {field: value}: PEFT config fields that depend on the leaves' values, not only the config
        (AdaLoRA's `rank_pattern`: the ranks its allocator removed); written on export, computed before `export_as`.
    target_in(fields, target, tensors, where) -> tensors: one target's tensors as read from the file (by leaf), as
        the leaves lora_func holds, before the shape check; may add leaves the file lacks (AdaLoRA: the ranks
        `rank_pattern` removed put back as zeros, and the `rank_mask` leaf).
    tensors_in(tensors, fields, where) -> tensors: the file's tensors as lora_func reads them, before any other
        check (PEFT's `_remap_adapter_state_dict_for_load`: VBLoRA's top-k files to full logits); may raise.
    tensors_out(tensors, cfg) -> tensors: the tensors to write, as PEFT's `save_pretrained` writes them (RandLoRA's
        copies of the shared bases under every target, VBLoRA's top-k files).
    rebuild receives the target's read-only base-layer view (`lora_func._kind.BaseLayer`): `base.weight()` is the
        dense weight in the kind's layout.
    """

    variant: str
    peft_type: str
    keys: Mapping[str, str]
    rank_fields: tuple[str, str | None] | None = ("r", "rank_pattern")
    alpha_fields: tuple[str, str | None] | None = ("lora_alpha", "alpha_pattern")
    required: Mapping[str, Any] = field(default_factory=dict)
    inert: Mapping[str, Any] = field(default_factory=dict)
    absent: tuple[str, ...] = ()
    fields_out: Callable[[AdapterConfig, Mapping[str, Any]], dict[str, Any]] = lambda cfg, written: {}
    fields_in: Callable[[Mapping[str, Any], str], dict[str, Any]] = lambda fields, where: {}
    handled: tuple[str, ...] = ()
    claims: Callable[[Mapping[str, Any], list[str], str], bool] = claims_any
    export_as: Callable[[Params], Params] | None = None
    rebuild: Callable[[BaseLayer, AdapterConfig, Leaves], Leaves] | None = None
    tensor_out: Callable[[str, torch.Tensor], torch.Tensor] = lambda leaf, tensor: tensor
    tensor_in: Callable[[str, torch.Tensor, tuple[int, ...]], torch.Tensor] = lambda leaf, tensor, shape: tensor
    shared_keys: Mapping[str, str] = field(default_factory=dict)
    shared_stored: Callable[[Mapping[str, Any]], bool] = lambda fields: True
    derived: Mapping[str, Callable[[Target, AdapterConfig], torch.Tensor]] = field(default_factory=dict)
    kinds: tuple[str, ...] = ("linear",)
    conv_dims: tuple[int, ...] = (1, 2, 3)
    conv_dilation: bool = False
    check_model: Callable[[Any, tuple, str], None] | None = None
    leaf_fields: Callable[[Params], dict[str, Any]] | None = None
    target_in: Callable[[Mapping[str, Any], Target, Tensors, str], Tensors] | None = None
    tensors_in: Callable[[dict[str, torch.Tensor], Mapping[str, Any], str], dict[str, torch.Tensor]] | None = None
    tensors_out: Callable[[dict[str, torch.Tensor], AdapterConfig], dict[str, torch.Tensor]] | None = None


def refuse(where: str, name: str, value: Any, why: str) -> None:
    raise ValueError(f"{where}: `{name}`={json.dumps(value)} is not supported: {why}")


def flag(fields: Mapping[str, Any], name: str, where: str) -> bool:
    """A PEFT boolean field (false when absent); anything but true/false is refused."""
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"{where}: `{name}` must be true or false, got {json.dumps(value)}")
    return value


def describe(paths: list[str]) -> str:
    """`q_proj, v_proj (8 modules)`: module paths by their last name, for messages."""
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    return f"{', '.join(names)} ({len(paths)} modules)"
