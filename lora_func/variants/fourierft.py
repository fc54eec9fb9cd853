"""FourierFT: the weight change is the real part of the inverse 2-D DFT of a sparse, learned spectrum.

    F (d_out, d_in) = 0 but for F[p_k] = c_k,   k < n = `n_frequency`
    ΔW = s · Re(ifft2(F)),   s = `scaling`          y' = y + x ΔWᵀ

p_0, p_1, … are the first n of `torch.randperm(d_out · d_in)` drawn from a generator seeded with `random_loc_seed`
(flat row-major positions; PEFT's `indices` rows and columns), in drawn order: c_k sits at p_k. They are no leaves:
a function of the target's shape, `n_frequency` and the seed (as in PEFT, whose files do not store them either),
computed once per shape and device. The leaf `fourierft_spectrum` (n,) holds the coefficients. As PEFT, the forward
builds ΔW (ifft2 in float32, complex64) and applies it, so outputs and gradients are PEFT's to rounding: on a float
`nn.Linear` in the leaves' dtype a call of one adapter runs the layer once on W + ΔW (`ParameterForm`: one product
forward and two backward, where PEFT's y + x ΔWᵀ takes two and three); mixed batches and compiled code add x ΔWᵀ to
the base output. ΔW is not
low rank in general (each frequency adds a rank-2 cosine/sine pattern): `Dense`. On transformers' Conv1D, ΔW is
in the (d_out, d_in) layout as on nn.Linear (PEFT transposes it only to merge).
Identity at init: c = 0 with `init_weights=True` (the default here; PEFT's default False draws c ~ N(0, 1), which
is not the identity).
Gao et al. 2024, arXiv 2405.03003. Reference: peft/tuners/fourierft/layer.py (`update_layer`, `get_delta_weight`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._config import AdapterConfig, ConfigError
from .._kind import Target
from .._variant import LINEAR_LIKE, Dense, Init, Leaves, ParameterForm, PeftExchange, Recipe, Site, Variant
from .shira import on_float_linear, random_positions, scattered


@dataclass(frozen=True)
class FourierFTConfig(AdapterConfig):
    """FourierFT (PEFT's `FourierFTConfig`): `n_frequency` (1000) learned coefficients per target, at most
    d_in · d_out; `scaling` (150) multiplies ΔW; `random_loc_seed` (777) places the frequencies. `r` and `alpha` are
    unused. `init_weights=True` (zero spectrum, the identity) is the default here, unlike PEFT's False (c ~ N(0, 1))."""

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_frequency <= 0:
            raise ConfigError(f"FourierFTConfig: `n_frequency` must be a positive int, got {self.n_frequency}")
        if self.random_loc_seed < 0:
            raise ConfigError(f"FourierFTConfig: `random_loc_seed` must be an int >= 0, got {self.random_loc_seed}")


def shapes(target: Target, cfg: FourierFTConfig) -> dict[str, tuple[int, ...]]:
    size = target.d_in * target.d_out
    if cfg.n_frequency > size:
        raise ValueError(
            f"FourierFTConfig: `n_frequency`={cfg.n_frequency} exceeds the {size} entries of {target.path!r} "
            f"({target.d_in} -> {target.d_out})"
        )
    return {"fourierft_spectrum": (cfg.n_frequency,)}


def create(target: Target, cfg: FourierFTConfig, init: Init) -> Leaves:
    (n,) = shapes(target, cfg)["fourierft_spectrum"]
    if cfg.init_weights:
        return {"fourierft_spectrum": torch.zeros(n)}
    return {"fourierft_spectrum": torch.randn(n, generator=init.generator)}


def delta(spectrum: torch.Tensor, site: Site) -> torch.Tensor:
    """ΔW (d_out, d_in) in the spectrum's dtype: PEFT's `get_delta_weight` (a float32 spectrum, ifft2, real part)."""
    target = site.target
    flat = random_positions(
        target.d_out * target.d_in, spectrum.shape[-1], site.config.random_loc_seed, spectrum.device, sort=False
    )
    dense = scattered(spectrum, flat, target, torch.float32)
    return (torch.fft.ifft2(dense).real * site.config.scaling).to(spectrum.dtype)


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    dw = delta(leaves["fourierft_spectrum"], site)
    return y + F.linear(x.to(dw.dtype), dw).to(y.dtype)


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    return weight + delta(leaves["fourierft_spectrum"], site).to(weight.dtype), bias


VARIANT = Variant(
    name="fourierft",
    config=FourierFTConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    kinds=LINEAR_LIKE,
    capabilities=(
        Dense(),
        ParameterForm(on_float_linear),
        PeftExchange("fourierft"),
        Recipe(lr=3e-2),  # MiniLM demo, 50 steps: held-out loss 0.879 -> 0.495 (1e-2: 0.568; 3e-3: 0.697)
    ),
)
