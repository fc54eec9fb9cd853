"""LN Tuning: train a copy of the weight (and bias) of each normalisation layer; the rest of the model stays frozen.

    y' = norm(x; w', b')       the layer's own computation with its parameters replaced by the leaves w', b'
    W' = w',  b' = b'          (ΔW = w' − w, Δb = b' − b)

The layer computes as it always does (LayerNorm, RMSNorm, Qwen3's and Llama's RMSNorm, Gemma's 1 + w, ...: see
`lora_func/kinds/norm.py`), with the leaves, cast to its parameters' dtype, in place of its own. That is PEFT's
`LNTuningLayer`, which runs a deep copy of the layer: a call of one adapter runs the layer once with the leaves
in place of its parameters (`ParameterForm`); mixed batches and compiled code run it again at its output, on the
leaves (`forward`). `r` and `alpha` are unused.
Identity at init: the leaves are copies of the layer's own weight and bias, so the output is the base's, bitwise.
Zhao et al. 2023, "Tuning LayerNorm in Attention", arXiv 2312.11420. Reference: peft/tuners/ln_tuning/layer.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._config import AdapterConfig
from .._kind import Target
from .._variant import Dense, Init, Leaves, ParameterForm, PeftExchange, Recipe, Site, Variant
from ..kinds.norm import run


@dataclass(frozen=True)
class LNTuningConfig(AdapterConfig):
    """LN Tuning (PEFT's `LNTuningConfig`): a trainable copy of each targeted norm layer's weight and bias. With
    `target_names` None every normalisation layer is a target (PEFT picks them per architecture). `r` and `alpha`
    are unused."""


def shapes(target: Target, cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
    d = target.d_out
    return {"weight": (d,), "bias": (d,)} if target.get("bias") else {"weight": (d,)}


def create(target: Target, cfg: LNTuningConfig, init: Init) -> Leaves:
    leaves = {"weight": init.weight().reshape(-1).clone()}
    if target.get("bias"):
        leaves["bias"] = init.bias().clone()
    return leaves


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    module = site.base.module
    own = module._parameters
    return run(module, x, {name: leaf.to(own[name].dtype) for name, leaf in leaves.items()})


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    new_bias = leaves["bias"].to(bias.dtype) if "bias" in leaves else bias
    return leaves["weight"].to(weight.dtype).reshape(weight.shape), new_bias


VARIANT = Variant(
    name="ln_tuning",
    config=LNTuningConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    kinds=("norm",),
    capabilities=(
        Dense(),
        ParameterForm(lambda site: True),  # a norm's parameters are float; the leaves are cast to their dtype
        PeftExchange("ln_tuning"),
        Recipe(lr=1e-2),  # a gain and a shift per feature, each near 1 or 0: a large lr, as IA3's
    ),
)
