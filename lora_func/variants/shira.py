"""SHiRA: a sparse high-rank weight change, trained on a fixed random set of r·(d_in + d_out) entries of W.

    ΔW[p_k] = w_k,   k < n = r·(d_in + d_out),   every other entry 0       (as many values as LoRA at rank r)
    y' = y + x ΔWᵀ

p_0 < p_1 < … are the entries (row-major, in the (d_out, d_in) weight) that PEFT's `random_mask` picks: the first n
of `torch.randperm(d_out · d_in)` drawn from a `torch.Generator` seeded with `random_seed` (PEFT's default `None`:
a fresh generator, whose seed is torch's fixed default), sorted, as `torch.where(mask)` lists them. The positions
are no leaves: a function of the target's shape, `r` and `random_seed`, computed once per shape and device
(`positions`), so PEFT's `shira_indices` are written on export and checked on import. The leaf `shira_weight`
(n,) holds the values. ΔW is sparse, not low rank: adapter arithmetic needs the base model (`Dense`).
As PEFT, the forward builds ΔW (dense, d_out × d_in) and, on a float `nn.Linear` in the leaves' dtype, adds it to
W first, x (W + ΔW)ᵀ + b: a call of one adapter runs the layer once on W + ΔW (`ParameterForm`, as PEFT), mixed
batches and compiled code compute x (W + ΔW)ᵀ + b at the output (the base output left unused: one product less
than y + x ΔWᵀ, forward and backward); on other layers (bitsandbytes, Conv1D, another dtype) y + x ΔWᵀ, equal to
rounding. Identity at init: w = 0 (PEFT's `init_weights=True`); `init_weights=False` draws w ~ N(0, 1).
Bhardwaj et al. 2024, arXiv 2406.13175. Reference: peft/tuners/shira/layer.py (`Linear.get_delta_weight`,
`forward`), mask_functions.py (`random_mask`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._config import AdapterConfig, ConfigError
from .._kind import Target
from .._variant import LINEAR_LIKE, Dense, Init, Leaves, ParameterForm, PeftExchange, Recipe, Site, Variant


@dataclass(frozen=True)
class SHiRAConfig(AdapterConfig):
    """SHiRA (PEFT's `ShiraConfig`): `r` (PEFT's default 32) sets the number of trained entries, r·(d_in + d_out)
    per target (not a rank); `alpha` is unused (PEFT's scale 1). `mask_type`: "random" only (PEFT's custom mask
    functions are code, not config). `random_seed`: the mask's seed (None: torch's default generator seed, as
    PEFT). `init_weights=False` draws the values ~ N(0, 1) (not the identity)."""

    r: int = 32
    mask_type: str = "random"
    random_seed: int | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_type != "random":
            raise ConfigError(f"SHiRAConfig: `mask_type` must be 'random', got {self.mask_type!r}")
        if self.random_seed is not None and self.random_seed < 0:
            raise ConfigError(f"SHiRAConfig: `random_seed` must be an int >= 0 or None, got {self.random_seed}")


def count(target: Target, cfg: AdapterConfig) -> int:
    return cfg.r * (target.d_in + target.d_out)


def shapes(target: Target, cfg: SHiRAConfig) -> dict[str, tuple[int, ...]]:
    n, size = count(target, cfg), target.d_in * target.d_out
    if n > size:
        raise ValueError(
            f"SHiRAConfig: `r`={cfg.r} gives {n} entries, more than the {size} of {target.path!r} "
            f"({target.d_in} -> {target.d_out})"
        )
    return {"shira_weight": (n,)}


def create(target: Target, cfg: SHiRAConfig, init: Init) -> Leaves:
    n = shapes(target, cfg)["shira_weight"][0]
    if cfg.init_weights:
        return {"shira_weight": torch.zeros(n)}
    return {"shira_weight": torch.randn(n, generator=init.generator)}


@functools.lru_cache(maxsize=256)
def random_positions(size: int, n: int, seed: int | None, device: torch.device, *, sort: bool) -> torch.Tensor:
    """The first n of `torch.randperm(size)` from a generator seeded with `seed` (None: a fresh generator, torch's
    default seed), sorted or not, int64 on `device`; computed once per arguments (a forward reads it every step).
    SHiRA's mask (sorted) and FourierFT's frequencies (as drawn)."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    drawn = torch.randperm(size, generator=generator)[:n]
    return (drawn.sort().values if sort else drawn).to(device)


def positions(target: Target, n: int, seed: int | None, device: torch.device) -> torch.Tensor:
    """The sorted flat (row-major) positions of ΔW's n entries in the (d_out, d_in) weight (PEFT's `random_mask`)."""
    return random_positions(target.d_out * target.d_in, n, seed, device, sort=True)


def indices(target: Target, cfg: AdapterConfig) -> torch.Tensor:
    """PEFT's `shira_indices` of a target: (2, n) int32 rows and columns of the entries."""
    flat = positions(target, count(target, cfg), cfg.random_seed, torch.device("cpu"))
    return torch.stack([flat // target.d_in, flat % target.d_in]).to(torch.int32)


def scattered(values: torch.Tensor, flat: torch.Tensor, target: Target, dtype: torch.dtype) -> torch.Tensor:
    """A (d_out, d_in) matrix of `dtype`, zero but for `values` at the flat positions `flat` (vmappable)."""
    size = target.d_out * target.d_in
    out = torch.zeros(size, dtype=dtype, device=values.device).index_put((flat,), values.to(dtype))
    return out.view(target.d_out, target.d_in)


def delta(w: torch.Tensor, site: Site) -> torch.Tensor:
    """ΔW (d_out, d_in) in w's dtype: w at its positions."""
    return scattered(w, positions(site.target, w.shape[-1], site.config.random_seed, w.device), site.target, w.dtype)


def on_float_linear(site: Site) -> bool:
    """A float `nn.Linear` whose weight has the leaves' dtype: W + ΔW loses nothing of ΔW in its dtype."""
    module = site.base.module
    return type(module) is nn.Linear and module.weight.dtype == site.config.dtype


def added(weight: torch.Tensor, w: torch.Tensor, site: Site) -> torch.Tensor:
    """W + ΔW in W's dtype: a copy of W with w added at its positions (no dense ΔW built: one pass over W, not three;
    bitwise W + ΔW, since ΔW is 0 elsewhere)."""
    w = w.to(weight.dtype)
    flat = positions(site.target, w.shape[-1], site.config.random_seed, w.device)
    return weight.reshape(-1).index_put((flat,), w, accumulate=True).view(weight.shape)


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    w = leaves["shira_weight"]
    module = site.base.module
    if type(module) is nn.Linear and y.dtype == w.dtype:
        # PEFT's form, x (W + ΔW)ᵀ + b: one product forward and two backward where y + x ΔWᵀ takes two and three (the
        # base output y is not used, so nothing differentiates through it).
        return F.linear(x.to(w.dtype), added(site.base.weight().to(w.dtype), w, site), site.base.bias)
    return y + F.linear(x.to(w.dtype), delta(w, site)).to(y.dtype)


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    return added(weight, leaves["shira_weight"], site), bias


VARIANT = Variant(
    name="shira",
    config=SHiRAConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    kinds=LINEAR_LIKE,
    capabilities=(
        Dense(),
        ParameterForm(on_float_linear),
        PeftExchange("shira"),
        Recipe(lr=3e-3),  # MiniLM demo, 50 steps: held-out loss 0.879 -> 0.400 (1e-3: 0.469; 3e-4: 0.565)
    ),
)
