"""Blocks: a model's repeated layers (a decoder layer, BERT's `encoder.layer.<i>`), adapted at their output hidden
states by interventions (ReFT), never through a weight.

    h = block(x),  (batch, seq, d)        an intervention edits h at chosen positions: h' = Φ(h)

A block is recognised as transformers recognises its own: a `GradientCheckpointingLayer` (every decoder and encoder
layer of transformers 5). The kind is `listed_only`: only a variant that lists "block" sees it, so that LoRA's
`target_names=("layers.0",)` still means the linear layers inside block 0. `d_in = d_out = d`, the hidden size.
A block has no weight: `merge` and `delta_weights` refuse it by name.
"""

from __future__ import annotations

from torch import nn

from .._kind import BaseLayer, Kind, Target
from .linear import is_linear_like


def is_block(module: nn.Module) -> bool:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers is optional
        return False
    return isinstance(module, GradientCheckpointingLayer)


def hidden_size(module: nn.Module) -> int | None:
    """The width of the hidden states a block reads and writes: its `hidden_size`, else its first linear layer's
    (or transformers Conv1D's) input features: attention reads the hidden state first."""
    width = getattr(module, "hidden_size", None)
    if isinstance(width, int):
        return width
    for sub in module.modules():
        if is_linear_like(sub):
            return sub.in_features
        if isinstance(getattr(sub, "nx", None), int):  # transformers' Conv1D (GPT-2): weight (nx, nf)
            return sub.nx
    return None


def describe(path: str, module: nn.Module, roles) -> Target:
    width = hidden_size(module)
    if width is None:
        raise ValueError(f"block {path!r} ({type(module).__name__}) has no `hidden_size` and no linear layer")
    return Target(path, width, width, roles(width, width), "block", type(module).__name__)


def check(module: nn.Module, target: Target) -> str | None:
    if not is_block(module):
        return f"is a {type(module).__name__}, not a block (a transformers decoder or encoder layer)"
    if type(module).__name__ != target.module:
        return f"is a {type(module).__name__} in the model, the adapter holds a {target.module}"
    if hidden_size(module) != target.d_out:
        return f"has hidden size {hidden_size(module)} in the model, the adapter holds {target.d_out}"
    return None


def weight(base: BaseLayer):
    raise ValueError(
        f"{base.target.path!r} is a block ({base.target.module}): an intervention edits its output hidden states at "
        "chosen positions, which no weight change expresses; there is nothing to merge or to take a ΔW of. Run the "
        "adapter unmerged (lf.apply, lf.inject)"
    )


def bias(base: BaseLayer) -> None:
    return None


KIND = Kind(
    name="block",
    recognise=is_block,
    describe=describe,
    check=check,
    weight=weight,
    bias=bias,
    by_default=True,
    listed_only=True,
)
