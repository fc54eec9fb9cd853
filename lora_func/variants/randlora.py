"""RandLoRA: full-rank updates from frozen random bases shared by all targets, scaled by per-target trainable
diagonals.

    m = min(d_in, d_out), M = max(d_in, d_out), n = ⌈m / r⌉ bases (so that r · n >= m: full rank)
    A_s = A[:, 0, :m] (r, m),  B_s = B[:M, :n, :] (M, n, r)      slices of the shared frozen bases
    S[j, b, :] = λ[j, b] · A_s[j, :] ⊙ γ[b, :]                   (r, n, m), λ (r, n) and γ (n, m) trainable
    U_A = S flattened (j, b) -> (r·n, m),   U_B = B_s flattened (b, j) -> (M, n·r)
    ΔW = s · U_B U_A (d_in <= d_out: (d_out, d_in)),  ΔW = s · U_Aᵀ U_Bᵀ (d_out < d_in),   s = `randlora_alpha` / r
    y' = y + x ΔWᵀ

The two flattenings pair column k of U_B with row k of U_A although they order (base, rank) differently; that is
PEFT's formula, and this file follows it so that outputs and gradients are PEFT's given the same leaves. ΔW is an
exact low-rank product of inner dimension r · n (`LowRank`): adapter arithmetic concatenates it as LoRA's.
A (r, 1, max m) and B (max M, max n, r) are frozen and stored once (the shared entry, as PEFT's
`save_projection=True`): drawn from a generator seeded with `projection_prng_key`, A first, then B one base at a
time, kaiming-uniform in bfloat16 and divided by their standard deviation, as PEFT draws them (the values are
bfloat16's, held in the config's dtype); `sparse` / `very_sparse` draw ternary {−1, 0, 1} bases with probability
1/6 (1/(2√m)) for each sign, std-normalised, as PEFT. `rank_pattern` is refused (the bases have one rank); `alpha`
is unused (`randlora_alpha` is PEFT's scale numerator).
Identity at init: λ = 0 (γ = 1 / max(n, m), PEFT's `init_weights=True`).
Albert et al. 2025, arXiv 2502.00987. Reference: peft/tuners/randlora/layer.py (`get_scaled_bases`), model.py
(`_init_randlora_A_randlora_B`, `_init_randlora_A_randlora_B_sparse`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._config import AdapterConfig, ConfigError
from .._kind import Target
from .._variant import LINEAR_LIKE, Init, Leaves, LowRank, PeftExchange, Recipe, Site, Variant
from ..kinds.linear import factored_forms


@dataclass(frozen=True)
class RandLoRAConfig(AdapterConfig):
    """RandLoRA (PEFT's `RandLoraConfig`). `r` (32): the rank of each random base, so fewer bases and fewer
    trainable values as it grows; `randlora_alpha` (640, PEFT's advice: 20 · r): the scale is `randlora_alpha / r`;
    `alpha` is unused. `projection_prng_key` (0) seeds the shared bases (independent of `init`'s `seed`, as in PEFT);
    `sparse` / `very_sparse` draw ternary bases instead of dense ones."""

    r: int = 32
    randlora_alpha: float = 640.0
    projection_prng_key: int = 0
    sparse: bool = False
    very_sparse: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.projection_prng_key < 0:
            key = self.projection_prng_key
            raise ConfigError(f"RandLoRAConfig: `projection_prng_key` must be an int >= 0, got {key}")
        if self.rank_pattern:
            raise ConfigError("RandLoRAConfig: `rank_pattern` must be empty: all targets share the bases' rank `r`")


def bases(target: Target, r: int) -> int:
    """n = ⌈min(d_in, d_out) / r⌉: enough bases of rank r for a full-rank update (PEFT's `num_bases`)."""
    return math.ceil(min(target.d_in, target.d_out) / r)


def shapes(target: Target, cfg: RandLoRAConfig) -> dict[str, tuple[int, ...]]:
    n = bases(target, cfg.r)
    return {"randlora_lambda": (cfg.r, n), "randlora_gamma": (n, min(target.d_in, target.d_out))}


def create(target: Target, cfg: RandLoRAConfig, init: Init) -> Leaves:
    n, m = shapes(target, cfg)["randlora_gamma"]
    return {"randlora_lambda": torch.zeros(cfg.r, n), "randlora_gamma": torch.full((n, m), 1 / max(n, m))}


def _largest(targets: tuple[Target, ...]) -> tuple[int, int]:
    """(max M, max m) over the targets' largest (d_out, d_in), as PEFT's `_find_dim`."""
    d_out, d_in = max(t.d_out for t in targets), max(t.d_in for t in targets)
    return max(d_out, d_in), min(d_out, d_in)


def shared_shapes(targets: tuple[Target, ...], cfg: RandLoRAConfig) -> dict[str, tuple[int, ...]]:
    M, m = _largest(targets)
    return {"randlora_A": (cfg.r, 1, m), "randlora_B": (M, math.ceil(m / cfg.r), cfg.r)}


def create_shared(targets: tuple[Target, ...], cfg: RandLoRAConfig, init: Init) -> Leaves:
    shape = shared_shapes(targets, cfg)
    generator = torch.Generator().manual_seed(cfg.projection_prng_key)
    if cfg.sparse or cfg.very_sparse:
        sparsity = math.sqrt(_largest(targets)[1]) if cfg.very_sparse else 3
        A = _ternary(torch.rand(shape["randlora_A"], generator=generator), sparsity)
        B = _ternary(torch.rand(shape["randlora_B"], generator=generator), sparsity)
    else:  # bfloat16 draws, as PEFT's `_kaiming_init` (where bfloat16 is available, as on every CPU)
        A = _kaiming(shape["randlora_A"], generator)
        M, n, r = shape["randlora_B"]
        B = torch.cat([_kaiming((M, 1, r), generator) for _ in range(n)], dim=1)
    return {"randlora_A": (A / A.std()).float(), "randlora_B": (B / B.std()).float()}


def _kaiming(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=torch.bfloat16)
    return torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


def _ternary(uniform: torch.Tensor, sparsity: float) -> torch.Tensor:
    out = torch.zeros(uniform.shape)
    out[uniform < 1 / (2 * sparsity)] = -1
    out[uniform > 1 - 1 / (2 * sparsity)] = 1
    return out


def factors(leaves: Leaves, site: Site) -> tuple[torch.Tensor, torch.Tensor]:
    """(B' (d_out, r·n), A' (r·n, d_in)) with ΔW = B' A', the scale folded into B'."""
    target, r = site.target, site.config.r
    lam, gamma = leaves["randlora_lambda"], leaves["randlora_gamma"]  # (r, n), (n, m)
    n, m = gamma.shape[-2:]
    A_s = leaves["randlora_A"][..., :, 0, :m].to(lam.dtype)  # (r, m)
    B_s = leaves["randlora_B"][..., : max(target.d_in, target.d_out), :n, :].to(lam.dtype)  # (M, n, r)
    U_A = (lam[..., :, :, None] * A_s[..., :, None, :] * gamma[..., None, :, :]).flatten(-3, -2)  # (r·n, m)
    U_B = B_s.flatten(-2, -1)  # (M, n·r)
    s = site.config.randlora_alpha / r
    if target.d_in <= target.d_out:
        return s * U_B, U_A
    return s * U_A.transpose(-1, -2), U_B.transpose(-1, -2)


forward, merge = factored_forms(factors)  # y + x Aᵀ Bᵀ, W + B A


VARIANT = Variant(
    name="randlora",
    config=RandLoRAConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    frozen=("randlora_A", "randlora_B"),
    shared_shapes=shared_shapes,
    create_shared=create_shared,
    kinds=LINEAR_LIKE,
    capabilities=(
        LowRank(lambda leaves, site, weight: factors(leaves, site)),
        PeftExchange("randlora"),
        # MiniLM demo, 50 steps, r = 32 (PEFT's default; 12 bases of the 384 dims): held-out loss 0.879 -> 0.436,
        # accuracy 74.2% -> 84.6%, 179,712 values. The scale randlora_alpha / r = 20 asks for a small lr.
        Recipe(lr=3e-4, options=(("r", 32),)),
    ),
)
