"""How each layer kind (`lora_func/kinds/`) appears in PEFT's files, and which PEFT methods have it.

linear, conv1d   the method's own names and layouts (`PeftMethod.keys`, `tensor_out`); transformers Conv1D
                 is PEFT's `fan_in_fan_out=True`, one flag for all targets (its factors are laid out as for
                 nn.Linear), so an adapter mixing Conv1D and nn.Linear targets has no PEFT config
conv             LoRA / DoRA as on linear layers (PEFT's conv factors have lora_func's shapes), DoRA's
                 `lora_magnitude_vector` and IA3's `ia3_l` as (1, C, 1, ...); PEFT's conv A has no dilation
                 and pads with zeros, and PEFT's IA3 has no nn.Conv1d (`PeftMethod.conv_dims`): such targets are refused
embedding        `lora_embedding_A` (r, num_embeddings), `lora_embedding_B` (d, r); PEFT's default save also
                 stores the base embedding (`<path>.base_layer.weight`, `save_embedding_layers`): read only
                 where it is the model's own, bitwise, and refused otherwise (lora_func never writes weights)
experts          LoRA as PEFT's `target_parameters`: `lora_A.weight` (E·r, d_in), `lora_B.weight` (d_out, r·E)
                 on the module; several targeted parameters of one module nest, the last registered one
                 outermost (`<module>.lora_A.weight`), the ones before under `.base_layer.` each
saved            `modules_to_save`: the copies under their own names, `<module path>.<parameter>`
"""

from __future__ import annotations

import torch

from .._kind import Target
from ._fields import KEY_PREFIX
from ._method import PeftMethod

EMBEDDING_KEYS = {"A": "lora_embedding_A", "B": "lora_embedding_B"}  # LoRA's factors on an nn.Embedding


def check_kind(method: PeftMethod, target: Target, caller: str) -> None:
    """PEFT's `method` has a layer for this target, computing what lora_func computes."""
    if target.kind == "saved":
        return
    if target.kind not in method.kinds:
        raise ValueError(
            f"{caller}: {target.path!r} ({target.module}) is a {target.kind} target, and PEFT's {method.peft_type} "
            f"({method.variant}) adapts {', '.join(method.kinds)} layers only"
        )
    if target.kind == "conv":
        dims = len(target.get("kernel_size"))
        if dims not in method.conv_dims:
            raise ValueError(
                f"{caller}: {target.path!r} is an nn.Conv{dims}d, which PEFT's {method.peft_type} does not adapt"
            )
        dilated = set(target.get("dilation")) != {1} and not method.conv_dilation
        if dilated or target.get("padding_mode") != "zeros":
            peft_conv = "PEFT's conv layer pads" if method.conv_dilation else "PEFT's conv A has no dilation and pads"
            raise ValueError(
                f"{caller}: {target.path!r} ({target.module}) has dilation={target.get('dilation')}, padding_mode="
                f"{target.get('padding_mode')!r}; {peft_conv} with zeros, so it would not compute what lora_func does"
            )


def fan_in_fan_out(targets: tuple[Target, ...], caller: str) -> bool:
    """PEFT's one `fan_in_fan_out` flag: true for transformers Conv1D targets, false for nn.Linear."""
    kinds = {t.kind for t in targets if t.kind in ("linear", "conv1d")}
    if len(kinds) > 1:
        raise ValueError(
            f"{caller}: the adapter has both transformers Conv1D and linear targets, and PEFT's `fan_in_fan_out` is "
            "one flag for all targets"
        )
    return kinds == {"conv1d"}


def _nesting(target: Target, targets: tuple[Target, ...]) -> str:
    """`.base_layer` once per targeted parameter of the same module registered after this one (PEFT's nesting)."""
    module = target.path.rpartition(".")[0]
    siblings = [t.path for t in targets if t.kind == "experts" and t.path.rpartition(".")[0] == module]
    return ".base_layer" * (len(siblings) - 1 - siblings.index(target.path))


def tensor_key(method: PeftMethod, target: Target, leaf: str, targets: tuple[Target, ...]) -> str:
    """The full key of a target's leaf in PEFT's tensor file."""
    if target.kind == "saved":
        return f"{KEY_PREFIX}{target.path}.{leaf}"
    if target.kind == "embedding" and leaf in EMBEDDING_KEYS:  # LoRA's factors; other methods' leaves by their names
        return f"{KEY_PREFIX}{target.path}.{EMBEDDING_KEYS[leaf]}"
    if target.kind == "experts":
        module = target.path.rpartition(".")[0]
        return f"{KEY_PREFIX}{module}{_nesting(target, targets)}.{method.keys[leaf]}"
    return f"{KEY_PREFIX}{target.path}.{method.keys[leaf]}"


def to_file(method: PeftMethod, target: Target, leaf: str, tensor: torch.Tensor) -> torch.Tensor:
    """A leaf in PEFT's layout."""
    if target.kind == "experts":
        if leaf == "A":  # (E, r, d_in) -> (E·r, d_in): expert-major rows
            return tensor.flatten(0, 1)
        return tensor.permute(1, 2, 0).flatten(1)  # (E, d_out, r) -> (d_out, r·E): expert-minor columns
    if target.kind == "conv" and tensor.dim() == 1:  # per-channel vectors (DoRA's magnitude, IA3's gain)
        return tensor.reshape(1, -1, *(1,) * len(target.get("kernel_size")))
    if target.kind in ("saved", "embedding", "conv"):
        return tensor
    return method.tensor_out(leaf, tensor)


def from_file(
    method: PeftMethod, target: Target, leaf: str, tensor: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    """A PEFT tensor as lora_func's leaf of `shape`; unchanged where it does not have PEFT's layout for it (the
    shape check then reports it)."""
    if target.kind in ("experts", "conv"):
        stored = to_file(method, target, leaf, torch.empty(shape, device="meta"))
        if tuple(tensor.shape) != tuple(stored.shape):
            return tensor
        if target.kind == "conv":
            return tensor.reshape(shape)
        E = shape[0]
        if leaf == "A":
            return tensor.reshape(shape)
        return tensor.reshape(shape[1], shape[2], E).permute(2, 0, 1).contiguous()  # (d_out, r·E) -> (E, d_out, r)
    if target.kind in ("saved", "embedding"):
        return tensor
    return method.tensor_in(leaf, tensor, shape)


def stored_layout(method: PeftMethod, target: Target, leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape PEFT stores a leaf of `shape` in, for messages."""
    return tuple(to_file(method, target, leaf, torch.empty(shape, device="meta")).shape)


def base_weight_key(target: Target) -> str | None:
    """Where PEFT's `save_embedding_layers` puts a targeted layer's own weight, or None for kinds it never saves."""
    return f"{KEY_PREFIX}{target.path}.base_layer.weight" if target.kind in ("embedding", "linear") else None
