"""What a layer kind is: how lora_func reads one kind of base layer, and what variants see of it.

A kind file (`lora_func/kinds/<name>.py`) defines its functions and ends with `KIND = Kind(...)`;
`lora_func/kinds/__init__.py` registers it with one line, as variants are registered.

Every kind is a linear map of its input with a dense weight W, read in one layout, `(d_out, fan_in)`:
rows are output features (channels), columns what one output reads (`d_in` for a linear layer,
`in_channels / groups · ∏ kernel` for a convolution). Variants do their algebra on that W (merge, norms,
SVDs) and, for the product they add to the output, call the kind's own `low_rank` (a matmul, a conv A
then a 1×1 conv B, an embedding lookup), as PEFT's per-layer classes do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ._sharded import full

SHARED = "<shared>"  # the params entry of leaves shared by all targets (VeRA's projections); never a module path


@dataclass(frozen=True)
class Target:
    """One adapted layer: its path, features, roles, kind, and the kind's static layout.

    path: the module's name in `model.named_modules()`; for a parameter target (`target_parameters`), the
        parameter's name in `model.named_parameters()`, e.g. "model.layers.0.mlp.experts.gate_up_proj".
    d_in, d_out: input and output features (channels for a convolution; `num_embeddings` and
        `embedding_dim` for an embedding; per expert for fused experts; 0 for a `modules_to_save` copy).
    roles: "reader", "writer", "inner" (see `lf.targets`); empty for a `modules_to_save` copy.
    kind: the name of its kind in `lora_func.kinds.KINDS` ("linear", "conv1d", "conv", ...).
    module: the base module's class name, e.g. "Linear4bit", "Conv2d".
    layout: what else the kind needs to know without the model, as (field, value) pairs: a conv's kernel,
        stride, padding, dilation and groups; the number of experts; a saved module's parameter shapes.
    """

    path: str
    d_in: int
    d_out: int
    roles: tuple[str, ...]
    kind: str
    module: str
    layout: tuple[tuple[str, Any], ...] = ()

    def get(self, field: str) -> Any:
        """The value of one layout field."""
        for name, value in self.layout:
            if name == field:
                return value
        raise KeyError(f"target {self.path!r} ({self.kind}) has no layout field {field!r}")

    def __str__(self) -> str:
        shape = "" if self.kind == "saved" else f"({self.d_in} -> {self.d_out})"
        return f"{self.path}  {self.module}{shape}  {'+'.join(self.roles) or self.kind}"


class Kind(NamedTuple):
    """The functions that make up one kind of base layer. Each takes the kind's `BaseLayer` view (or, before a
    model is at hand, its `Target`).

    name                                          the registry name, stored in `Target.kind`
    recognise(module) -> bool                     a module of this kind (None: selected by a config field instead)
    describe(path, module, roles) -> Target       its features, layout, and roles(d_in, d_out)
    check(module, target) -> str | None           what no longer matches between a module and a stored target
    weight(base) -> W                             the dense base weight, float32, `(d_out, fan_in)`, read-only
    bias(base) -> b | None                        the base bias, detached
    forward(base, x) -> y                         the base computation, without hooks and without base gradients
    project(base, rows) -> rows Wᵀ                W applied to rows in its column layout (None: from `weight`)
    state(base, W', b') -> {name: tensor}         a merged W' (and b') as the module's own parameters (its layout)
    low_rank_shapes(target, r) -> {A:, B:}        LoRA's factors on this kind, as PEFT shapes them
    init_low_rank(target, r, generator) -> leaves LoRA's initial A, B as PEFT draws them on this kind
    low_rank(base, x, A, B, s, y) -> y + Δy       s · B A x as this kind computes it, added to y (y None: Δy alone)
    low_rank_delta(base, A, B) -> ΔW              B A as a dense `(d_out, fan_in)` weight
    features(base, v) -> v'                       a per-feature vector shaped to broadcast over x or y's features
    input_gain(base, l) -> G                      the multiplier of W's columns that scaling input feature i by l_i is
    parameter_form                                injected by replacing module parameters (fused experts, saved
                                                  copies) rather than at the module's output
    by_default                                    targeted when `target_names` is None (linear-like layers)
    listed_only                                   a target only of variants that list the kind: for others a module
                                                  of it that `target_names` matches is passed over, not refused (norm
                                                  layers sit inside the blocks that name patterns select)
    layout_fields: {field: parse}                 the layout's fields; `parse` checks a stored (JSON) value and
                                                  returns it in `Target.layout` form, raising ValueError
    module_path(target) -> path                   the module a parameter target lives on (None: `target.path`)
    leaf_shapes(target) -> {leaf: shape}          for kinds whose leaves are their own (saved copies), else None:
                                                  the variant's `shapes` declares them
    create(base, dtype) -> leaves                 those leaves' initial values
    parameters(base, leaves) -> {name: tensor}    those leaves as the module's parameters, for the parameter form

    A field is None where the kind has no such operation; a variant that needs it does not list the kind.
    """

    name: str
    recognise: Callable[[nn.Module], bool] | None
    describe: Callable[..., Target]
    check: Callable[[nn.Module, Target], str | None]
    weight: Callable[[BaseLayer], torch.Tensor] | None = None
    bias: Callable[[BaseLayer], torch.Tensor | None] | None = None
    forward: Callable[[BaseLayer, torch.Tensor], torch.Tensor] | None = None
    project: Callable[[BaseLayer, torch.Tensor], torch.Tensor] | None = None
    state: Callable[..., dict[str, torch.Tensor]] | None = None
    low_rank_shapes: Callable[[Target, int], dict[str, tuple[int, ...]]] | None = None
    init_low_rank: Callable[..., dict[str, torch.Tensor]] | None = None
    low_rank: Callable[..., torch.Tensor] | None = None
    low_rank_delta: Callable[..., torch.Tensor] | None = None
    features: Callable[[BaseLayer, torch.Tensor], torch.Tensor] | None = None
    input_gain: Callable[[BaseLayer, torch.Tensor], torch.Tensor] | None = None
    parameter_form: bool = False
    by_default: bool = False
    listed_only: bool = False
    layout_fields: Mapping[str, Callable[[Any], Any]] = {}
    module_path: Callable[[Target], str] | None = None
    leaf_shapes: Callable[[Target], dict[str, tuple[int, ...]]] | None = None
    create: Callable[..., dict[str, torch.Tensor]] | None = None
    parameters: Callable[..., dict[str, torch.Tensor]] | None = None


class BaseLayer(NamedTuple):
    """A read-only view of one target's base layer: all a variant sees of the model.

    `weight()` is the dense float32 weight in the kind's `(d_out, fan_in)` layout (dequantized for bitsandbytes),
    `bias` the detached bias, `base(x)` the layer's computation on x without hooks and without gradients for
    its parameters, `project(rows)` = rows Wᵀ (no bias) for rows in W's column layout. `training` is the base
    module's flag (adapter dropout follows it, as PEFT's follows its layer's).
    """

    kind: Kind
    target: Target
    module: nn.Module

    def weight(self) -> torch.Tensor:
        return full(self.kind.weight(self))  # a layer sharded by FSDP2: gathered whole, this layer only

    @property
    def bias(self) -> torch.Tensor | None:
        bias = self.kind.bias(self)
        return None if bias is None else full(bias)

    @property
    def training(self) -> bool:
        return self.module.training

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kind.forward(self, x)

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """rows Wᵀ, (n, fan_in) -> (n, d_out): the base weight applied to rows laid out as W's columns."""
        if self.kind.project is not None:
            return self.kind.project(self, rows)
        return rows @ self.weight().to(rows.dtype).t()

    def low_rank(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
        """s · B A x, as this kind computes LoRA's product."""
        return self.kind.low_rank(self, x, A, B, s, None)

    def add_low_rank(
        self, y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float
    ) -> torch.Tensor:
        """y + s · B A x (fused where the kind can: addmm for linear layers)."""
        return self.kind.low_rank(self, x, A, B, s, y)

    def low_rank_delta(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """B A as a dense `(d_out, fan_in)` weight."""
        return self.kind.low_rank_delta(self, A, B)

    def features(self, v: torch.Tensor) -> torch.Tensor:
        """A per-feature vector, shaped to broadcast over the feature axis of this layer's input or output."""
        return self.kind.features(self, v)

    def input_gain(self, l: torch.Tensor) -> torch.Tensor:  # noqa: E741 (IA3's name)
        """The multiplier of W (broadcastable to `(d_out, fan_in)`) that scaling input feature i by l_i is."""
        return self.kind.input_gain(self, l)
