"""What a variant is: a few pure functions over tensors, bundled in a NamedTuple (optax-style), and the small
records that say what else it can do.

A variant file defines its config class and functions and ends with `VARIANT = Variant(...)`;
`lora_func/variants/__init__.py` registers it with one line. Beyond its forward and merge, a variant declares its
capabilities in `Variant.capabilities`, one small record each, and nothing outside its file keys on its name:

    WeightChange   its ΔW = W' − W: `LowRank(factors)` (exact sums by concatenation) or `Dense()` (from `merge`);
                   exactly one of the two, so a new variant is never silently taken for either; or
    Intervention   no ΔW at all: the adapter edits hidden states (ReFT), and merge and arithmetic refuse it
    Positions      the forward applies at some token positions of each row only (ReFT's first and last tokens)
    Padding        leaves zero-padded to a larger rank compute the same (`lf.stack(..., pad=True)`)
    PeftExchange   the module of `lora_func/peft/` that reads and writes it as a PEFT method
    Recipe         the learning rate and config fields the MiniLM demo and notebook 02 train it with
    Schedule       a step that changes the adapter during training (`lf.schedule`: AdaLoRA's rank budget)
    Regularizer    an extra loss the method needs (`lf.regularizer`: AdaLoRA's orthogonality)
    GradientCalibration  `init` calibrates on each target's mean weight gradient (`Init.gradient`, LoRA-GA)
                   rather than on its input statistics
    ParameterForm  where it applies, a call of one adapter runs the layer once on `merge`'s parameters instead of
                   `forward` recomputing the layer after the base ran (SHiRA, LN Tuning)

`Variant.capability(LowRank)` returns the record or None.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch

from ._config import AdapterConfig
from ._kind import BaseLayer, Target

Leaves = dict[str, torch.Tensor]
C = TypeVar("C")

LINEAR_LIKE = ("linear", "conv1d")  # the kinds with features last and y = x Wᵀ + b: every variant's math applies


class Site(NamedTuple):
    """Where a variant's forward runs: the target, the config it sees, and a read-only view of the base layer
    (`lora_func/_kind.py`, `BaseLayer`: its dense weight, bias, computation, and the kind's LoRA product)."""

    target: Target
    config: AdapterConfig
    base: BaseLayer


class InputStats(NamedTuple):
    """What calibration keeps of a target's inputs X (n, d_in): enough for their SVD, not X itself."""

    gram: torch.Tensor  # Xᵀ X, (d_in, d_in), float64
    count: int  # n, the number of calibration tokens seen
    total: torch.Tensor  # 1ᵀ X, the column sums, (d_in,), float64: with n, the mean for centring
    memo: dict  # what variants derive from these statistics (EVA's eigenvectors), computed once for all
    # the targets that share them (q/k/v read one tensor) and for `allocate` and `create` alike

    def covariance(self, center: bool = True) -> torch.Tensor:
        """Xᵀ X, or (X − 1μᵀ)ᵀ (X − 1μᵀ) = Xᵀ X − n μ μᵀ with `center` (a scatter matrix, not divided by n)."""
        if not center:
            return self.gram
        return self.gram - torch.outer(self.total, self.total) / self.count


class WeightGradient(NamedTuple):
    """What gradient calibration keeps of a target: the mean over its calls of dL/dW, not the activations."""

    mean: torch.Tensor  # dL/dW summed over the calibration batches, divided by `calls`; (d_out, d_in), float32
    calls: int  # how many calls of the target the loss depended on (one a batch for a layer run once per forward)
    count: int  # n, the number of calibration tokens that reached the target


class Init(NamedTuple):
    """What `create` may read besides the target and config."""

    weight: Callable[[], torch.Tensor]  # the dense base weight (dequantized, float32), computed on call
    generator: torch.Generator | None  # for random leaves; None = torch's global RNG
    inputs: InputStats | None = None  # calibration statistics, for variants with `calibrated=True`
    bias: Callable[[], torch.Tensor | None] = lambda: None  # the base bias (detached), computed on call
    gradient: WeightGradient | None = None  # the mean weight gradient, for variants with `GradientCalibration`


WeightFn = Callable[[], torch.Tensor]  # the dense base weight, read on demand


class LowRank(NamedTuple):
    """ΔW = B' A' (the scale folded into B'): `factors(leaves, site, weight) -> (B' (d_out, k), A' (k, d_in))`,
    leaves in the compute dtype, `weight()` the dense base weight (only where `reads_weight`: HRA's −W B A).
    Adapter arithmetic adds such ΔW exactly by concatenating factors (`lora_func/_arithmetic.py`)."""

    factors: Callable[[Leaves, Site, WeightFn], tuple[torch.Tensor, torch.Tensor]]
    reads_weight: bool = False


class Dense(NamedTuple):
    """ΔW is W' − W from the variant's `merge` (DoRA, IA3, ROAD rescale or rotate W): no exact low-rank sum, and
    adapter arithmetic needs the base model."""


class Intervention(NamedTuple):
    """No weight change expresses the adapter: it edits hidden states (ReFT at a block's output). `merge`,
    `delta_weights` and adapter arithmetic refuse it, by name. Declared instead of `LowRank` / `Dense`."""


class Positions(NamedTuple):
    """The forward applies at some positions of each row, the others keep the block's output: `counts(cfg) ->
    (first, last)`, the first and last non-padding tokens of each row (the model call's `attention_mask`), each capped
    at half the row's length (`lora_func/_positions.py`). A call that continues from a KV cache (a decoding step of
    `generate`) edits nothing: the prompt's positions are edited once, when the prompt runs."""

    counts: Callable[[AdapterConfig], tuple[int, int]]


class Padding(NamedTuple):
    """Zero-padding to a larger rank is exact (`lf.stack(..., pad=True)`): `axes` ((leaf, axis), ...) carry the rank
    (A-like leaves on rows, B-like on columns); the update is s · B A with s = alpha / r (alpha / √r with
    `use_rslora`), and `scaled` are the leaves s multiplies, rescaled when adapters' scales differ."""

    axes: tuple[tuple[str, int], ...]
    scaled: tuple[str, ...] = ("B",)


class PeftExchange(NamedTuple):
    """`module`: the module of `lora_func/peft/` whose `METHOD` (a `PeftMethod`) reads and writes this variant."""

    module: str


class Recipe(NamedTuple):
    """How the MiniLM demo (`python -m lora_func.demo --minilm`) and notebook 02 train this variant: AdamW's
    learning rate, and config fields beyond the shared ones (`options`, pairs: (("r", 32),))."""

    lr: float
    options: tuple[tuple[str, Any], ...] = ()


class Schedule(NamedTuple):
    """A training-time step (`lf.schedule`): `state(params) -> state` once before training; `step(params, state,
    step, grads) -> (params, state)` after each backward, `grads` the trainable leaves' gradients (`.grad` of the
    leaves in a torch.optim loop). It returns the params and the new state (a step that changes leaves does so in
    place, so that a torch.optim optimizer keeps updating the same tensors). `guard(params, caller, training)`,
    optional: run when an `apply` / `inject` of one adapter starts with grad enabled (`training`: the model's flag);
    it raises where training has gone on without the schedule (AdaLoRA: an optimizer step `lf.schedule` did not
    see)."""

    state: Callable[[Any], Any]
    step: Callable[[Any, Any, int, Any], tuple[Any, Any]]
    guard: Callable[[Any, str, bool], None] | None = None


class Regularizer(NamedTuple):
    """`loss(params) -> scalar tensor`: a term the method adds to the training loss (`lf.regularizer`)."""

    loss: Callable[[Any], torch.Tensor]


class GradientCalibration(NamedTuple):
    """`init`'s calibration runs the training loss forward and backward on each batch and keeps each target's mean
    weight gradient dL/dW (`Init.gradient`, `lora_func/_calibration.py`), as PEFT's LoRA-GA `preprocess_loraga`; the
    variant also sets `calibrated=True`."""


class ParameterForm(NamedTuple):
    """A variant whose `forward` recomputes the whole layer from its adapted parameters (SHiRA's x (W + ΔW)ᵀ + b,
    LN Tuning's norm with the leaves) wastes the base layer's own run, which the output form always pays: on the
    layers where `applies(site)` holds, a call of one adapter (not a mixed batch, not traced by torch.compile) is
    injected by parameters instead: for the module's forward, its ops see `merge`'s W' (and b') in place of its
    parameters (`lora_func/_inject/replace.py`), so the layer runs once, as PEFT runs it. `forward` remains the
    form of mixed batches and compiled code; the two agree to rounding."""

    applies: Callable[[Site], bool]


CAPABILITIES = (
    LowRank,
    Dense,
    Intervention,
    Positions,
    Padding,
    PeftExchange,
    Recipe,
    Schedule,
    Regularizer,
    GradientCalibration,
    ParameterForm,
)


class Variant(NamedTuple):
    """The pure functions that make up one adapter method.

    shapes(target, cfg) -> {leaf: shape}            per-target leaf shapes (validates rank)
    create(target, cfg, init) -> leaves             initial values (see `Init`)
    forward(x, y, leaves, site) -> y'               output form: adapted output from input and base output
    forward_input(x, leaves, site) -> x'            input form: the base layer then runs on x'
                                                    (a variant with both: the input form on linear-like kinds, the
                                                    output form on others, as OFT's rotated convolution kernel)
    inference(site, rows) -> run(x, y, leaves) -> y'  optional: the output form for one target in inference (an
                                                    eval-mode layer, grad off), built once per injection; with `rows`
                                                    (`AdapterRows`) row i uses adapter rows.index[i] of the stacked
                                                    leaves. None (built or returned): `forward` runs instead
    merge(weight, bias, leaves, site) -> (W', b')   the adapter folded into a dense float weight
    frozen                                          leaf names that do not train
    shared_shapes(targets, cfg) -> {leaf: shape}    leaves stored once for all targets (VeRA), or None
    create_shared(targets, cfg, init) -> leaves     their initial values
    kinds                                           the layer kinds it adapts (`lora_func/kinds/`); others are refused
    calibrated                                      `init` needs `calibration_data` (EVA, AntiPaSTO, LoRA-GA)
    allocate(targets, cfg, stats) -> (cfg, targets) after calibration, a refined config and the targets
                                                    that keep an adapter (EVA's rank redistribution)
    capabilities                                    what else it can do, one record each (see the module docstring)

    Forward and merge see a target's own leaves merged with the shared ones. `merge` works on the dense weight in
    the kind's `(d_out, fan_in)` layout; on a kind injected by parameters (fused experts) it is also the forward.
    `forward` and `forward_input` must be vmappable (torch ops only; no `.item()`, no branching on tensor values):
    K stacked adapters run them under `torch.func.vmap`, and so do mixed-adapter batches.
    """

    name: str
    config: type[AdapterConfig]
    shapes: Callable[[Target, AdapterConfig], dict[str, tuple[int, ...]]]
    create: Callable[[Target, AdapterConfig, Init], Leaves]
    merge: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    forward: Callable[..., torch.Tensor] | None = None
    forward_input: Callable[..., torch.Tensor] | None = None
    inference: Callable[..., Callable | None] | None = None
    frozen: tuple[str, ...] = ()
    shared_shapes: Callable[[tuple[Target, ...], AdapterConfig], dict[str, tuple[int, ...]]] | None = None
    create_shared: Callable[[tuple[Target, ...], AdapterConfig, Init], Leaves] | None = None
    kinds: tuple[str, ...] = LINEAR_LIKE
    calibrated: bool = False
    allocate: Callable[..., tuple[AdapterConfig, tuple[Target, ...]]] | None = None
    capabilities: tuple[Any, ...] = ()

    def capability(self, kind: type[C]) -> C | None:
        """The record of type `kind` this variant declares (`LowRank`, `Padding`, ...), or None."""
        for record in self.capabilities:
            if type(record) is kind:
                return record
        return None


def require_rank(target: Target, cfg: AdapterConfig) -> None:
    """`r` must fit the layer: 0 < r <= min(d_in, d_out)."""
    limit = min(target.d_in, target.d_out)
    if cfg.r > limit:
        raise ValueError(f"{type(cfg).__name__}: `r`={cfg.r} exceeds min(d_in, d_out)={limit} of {target.path!r}")
