"""C3A: the weight change is a block-circulant matrix, applied by FFT.

    ΔW = C(w) / d_in,    C(w) = [circ(w_ij)]  (d_out × d_in): block (i, j) the b × b circulant matrix of w_ij
    y' = y + x ΔWᵀ,      computed per block as real(FFT(Σ_j IFFT(x_j) ⊙ FFT(w_ij)))  / d_in

w (d_out / b, d_in / b, b) holds one length-b vector per block (b = `block_size`): d_out·d_in / b values, and ΔW is
of full rank in general. The forward runs in float32, as PEFT's (torch's CPU FFT has no half precision), with PEFT's
FFT ops in PEFT's order, so outputs and gradients are PEFT's to rounding; the gradients come from autograd through
the FFTs, where PEFT writes them by hand (the same formulas). `block_size=None` (lora_func's default) takes for each
target the largest b <= 256 dividing both d_in and d_out; PEFT's default, 256, divides neither of a small model's
widths. `r` and `alpha` are unused.
Identity at init: w = 0 (PEFT's `init_weights=True`, lora_func's default: DESIGN asks every method to start at the
identity; PEFT's default, xavier-uniform, is `init_weights=False`).
Chen et al. 2024, "Parameter-Efficient Fine-Tuning via Circular Convolution", arXiv 2407.19342.
Reference: peft/tuners/c3a/layer.py (`C3ALinear`), peft/tuners/c3a/utils.py (`BlockCircularConvolution`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._config import RULES, AdapterConfig
from .._kind import Target
from .._variant import LINEAR_LIKE, Dense, Init, Leaves, PeftExchange, Recipe, Site, Variant

LEAF = "c3a_kernel"  # PEFT's parameter name
RULES.setdefault("block_size", lambda b: None if b is None or b > 0 else f"must be a positive int, got {b!r}")


@dataclass(frozen=True)
class C3AConfig(AdapterConfig):
    """C3A (PEFT's `C3AConfig`): `block_size` b must divide every target's d_in and d_out (None: per target, the
    largest b <= 256 that does). `init_weights=False` draws the kernels xavier-uniform (PEFT's default; the adapter
    then does not start at the identity). `r` and `alpha` are unused."""

    block_size: int | None = None
    init_weights: bool = True


def block_size(target: Target, cfg: C3AConfig) -> int:
    """The target's b: `block_size`, checked to divide d_in and d_out, or the largest such b <= 256."""
    if cfg.block_size is None:
        return max(
            b
            for b in range(1, min(256, math.gcd(target.d_in, target.d_out)) + 1)
            if target.d_in % b == 0 and target.d_out % b == 0
        )
    if target.d_in % cfg.block_size or target.d_out % cfg.block_size:
        raise ValueError(
            f"C3AConfig: `block_size`={cfg.block_size} must divide d_in={target.d_in} and d_out={target.d_out} of "
            f"{target.path!r}"
        )
    return cfg.block_size


def shapes(target: Target, cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
    b = block_size(target, cfg)
    return {LEAF: (target.d_out // b, target.d_in // b, b)}


def create(target: Target, cfg: C3AConfig, init: Init) -> Leaves:
    shape = shapes(target, cfg)[LEAF]
    if cfg.init_weights:
        return {LEAF: torch.zeros(shape)}
    a = math.sqrt(3.0) * math.sqrt(2.0 / float(target.d_in + target.d_out))  # PEFT's xavier-uniform bound
    return {LEAF: torch.empty(shape).uniform_(-a, a, generator=init.generator)}


def circular(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x C(w)ᵀ for x (..., d_in) and w (m, n, b): PEFT's `BlockCircularConvolution.forward`, in its order."""
    _, n, b = w.shape
    x = x.reshape(*x.shape[:-1], n, b)
    x = torch.einsum("...nb,mnb->...mb", torch.fft.ifft(x), torch.fft.fft(w))
    x = torch.fft.fft(x).real
    return x.reshape(*x.shape[:-2], -1)


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    x = x.to(torch.float32)
    return y + (circular(x, leaves[LEAF].to(torch.float32)) / x.shape[-1]).to(y.dtype)


def dense(w: torch.Tensor) -> torch.Tensor:
    """C(w) (d_out, d_in): PEFT's `get_circulant_fast`, the circular product applied to the identity."""
    _, n, b = w.shape
    eye = torch.eye(n * b, dtype=w.dtype, device=w.device)
    return circular(eye, w).t()


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    return weight + dense(leaves[LEAF].to(weight.dtype)) / weight.shape[-1], bias


VARIANT = Variant(
    name="c3a",
    config=C3AConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    kinds=LINEAR_LIKE,
    capabilities=(
        Dense(),
        PeftExchange("c3a"),
        Recipe(lr=1e-1),  # ΔW = C(w) / d_in: each kernel value moves ΔW by 1/d_in
    ),
)
