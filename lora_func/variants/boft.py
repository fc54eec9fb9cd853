"""BOFT: the input rotated by a product of butterfly-permuted block-diagonal orthogonal matrices, the output scaled.

    n = fan_in (d_in; a convolution's d_in / groups · ∏kernel),  n = D · b   (D = `boft_block_num`, b =
        `boft_block_size`: exactly one is given, the other follows; m + 1 = `boft_n_butterfly_factor`)
    S_ij = ½ (Θ_ij − Θ_ijᵀ)                 Θ_ij (b, b): block j of factor i, i = 0..m, j = 0..D−1
    R_ij = (I − S_ij)(I + S_ij)⁻¹           the Cayley transform (a solve, as PEFT's `cayley_batch`)
    M_i  = P_i · diag(R_i0, …, R_i,D−1) · P_iᵀ   P_i the block-butterfly permutation of factor i (P_0 = I)
    R    = M_m ⋯ M_1 M_0
    y'   = s ⊙ ((x R) Wᵀ) + b,   W' = diag(s) W Rᵀ        s (d_out,): a trained per-output scale
           (computed as y_R + (s − 1) ⊙ (y_R − b), y_R = (x R) Wᵀ + b, so that s = 1 changes no bit of y_R)

Identity at init: Θ = 0, so every R_ij is exactly I (a solve of I by I), R = I, and s = 1 (PEFT's
`init_weights=True`); `init_weights=False` draws Θ ~ N(0, 0.1²), s ~ N(1, 0.1²) as PEFT does.
On linear-like layers the base layer runs on x R (bitsandbytes included) and its output is rescaled, as PEFT's
`Linear.forward`; the module's own output y is not used, so the base layer runs twice per call (PEFT instead builds
the dense n×n R with two n×n matmuls per factor, and multiplies x by it). On a convolution the kernel W' is
built and the layer's own convolution runs with it, as PEFT's `Conv2d.forward`. R is applied factor by factor as
blocks and index permutations, never as an n×n matrix.

PEFT's layers honour `boft_n_butterfly_factor` only where its CUDA extension (`fbd_cuda`) builds; elsewhere (any
machine without a CUDA toolchain) PEFT warns and uses 1, and its files then hold one factor. lora_func always
computes the factors asked for: what PEFT computes with its extension. `boft_dropout` (PEFT's multiplicative
dropout, training only) is not offered.
Liu et al. 2023, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization", arXiv 2311.06243.
Reference: peft/tuners/boft/layer.py (`BOFTLayer.update_layer`, `block_butterfly_perm`, `cayley_batch`,
`Linear.forward`, `Conv2d.forward`, `get_delta_weight`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .._config import AdapterConfig
from .._kind import Target
from .._variant import LINEAR_LIKE, Dense, Init, Leaves, PeftExchange, Recipe, Site, Variant
from ..kinds.conv import convolve
from .oft import cayley, features, rotate_blocks


@dataclass(frozen=True)
class BOFTConfig(AdapterConfig):
    """BOFT (PEFT's `BOFTConfig`). Exactly one of `boft_block_size` (PEFT's default 4) and `boft_block_num` is
    non-zero, and it must divide every target's fan-in (PEFT refuses the layer otherwise, as lora_func does);
    `boft_n_butterfly_factor` − 1 more butterfly factors, each doubling the reach of the blocks. `r` and `alpha`
    are unused. `boft_dropout` must be 0 (not offered)."""

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            self.boft_block_size < 0
            or self.boft_block_num < 0
            or (self.boft_block_size == 0) == (self.boft_block_num == 0)
        ):
            raise ValueError(
                "BOFTConfig: exactly one of `boft_block_size` and `boft_block_num` must be non-zero (their product "
                f"is each layer's fan-in), got {self.boft_block_size} and {self.boft_block_num}"
            )
        if self.boft_n_butterfly_factor < 1:
            raise ValueError(f"BOFTConfig: `boft_n_butterfly_factor` must be >= 1, got {self.boft_n_butterfly_factor}")
        if self.boft_dropout != 0.0:
            raise ValueError(
                f"BOFTConfig: `boft_dropout`={self.boft_dropout} is not supported (PEFT's multiplicative dropout, "
                "which sets random blocks to I in training); use 0"
            )
        if self.rank_pattern or self.alpha_pattern:
            raise ValueError("BOFTConfig: `rank_pattern` / `alpha_pattern` are not supported (BOFT has no rank)")


def blocks(target: Target, cfg: BOFTConfig) -> tuple[int, int, int]:
    """(factors m + 1, blocks D, block size b) for this target, checked as PEFT's `update_layer` checks them."""
    n, m = features(target), cfg.boft_n_butterfly_factor - 1
    where = f"BOFTConfig on {target.path!r} (fan-in {n})"
    if cfg.boft_block_num:
        count = cfg.boft_block_num
        if n % count:
            raise ValueError(f"{where}: `boft_block_num`={count} must divide {n}")
        if m and (2**m > count or count % 2**m):
            raise ValueError(
                f"{where}: `boft_block_num`={count} must be a multiple of 2^(`boft_n_butterfly_factor` − 1) = {2**m}"
            )
        size = n // count
    else:
        size = cfg.boft_block_size
        if n % (size * 2**m):
            raise ValueError(
                f"{where}: `boft_block_size`={size} times 2^(`boft_n_butterfly_factor` − 1) = {2**m} must divide {n}"
            )
        count = n // size
    if m and (count % 2 or size % 2):
        raise ValueError(
            f"{where}: with `boft_n_butterfly_factor` > 1 the block count ({count}) and size ({size}) must be even"
        )
    return m + 1, count, size


def shapes(target: Target, cfg: BOFTConfig) -> dict[str, tuple[int, ...]]:
    factors, count, size = blocks(target, cfg)
    scale = (1, target.d_out) if target.kind == "conv" else (target.d_out, 1)  # PEFT's layouts
    return {"boft_R": (factors, count, size, size), "boft_s": scale}


def create(target: Target, cfg: BOFTConfig, init: Init) -> Leaves:
    shape = shapes(target, cfg)
    if cfg.init_weights:
        return {"boft_R": torch.zeros(shape["boft_R"]), "boft_s": torch.ones(shape["boft_s"])}
    return {
        "boft_R": torch.normal(0.0, 0.1, shape["boft_R"], generator=init.generator),
        "boft_s": torch.normal(1.0, 0.1, shape["boft_s"], generator=init.generator),
    }


@functools.cache
def butterfly(n: int, count: int, half: int) -> tuple[int, ...]:
    """PEFT's `block_butterfly_perm(n, count, half)`: within each of `count` groups of n / count features, the chunks
    of `half` features in even positions first, then those in odd positions."""
    group = n // count
    chunks = group // half
    order = [c for c in range(0, chunks, 2)] + [c for c in range(1, chunks, 2)]
    within = [c * half + k for c in order for k in range(half)]
    return tuple(g * group + i for g in range(count) for i in within)


@functools.cache
def _indices(n: int, count: int, half: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.tensor(butterfly(n, count, half), device=device)
    return perm, torch.argsort(perm)


def rotate(x: torch.Tensor, R: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """x R (or x Rᵀ), R = M_m ⋯ M_0 with M_i = P_i diag(R_i·) P_iᵀ, for blocks R (m + 1, D, b, b), in R's dtype.
    P_i (PEFT's `perm2mat` of `block_butterfly_perm`) has P[j, p_j] = 1, so z P = z[argsort(p)] and z Pᵀ = z[p]."""
    factors, count, size = R.shape[:3]
    n = count * size
    z = x.to(R.dtype)
    for i in range(factors) if transposed else reversed(range(factors)):
        Ri = R[i].transpose(-1, -2) if transposed else R[i]
        if i == 0:  # P_0 = I (PEFT's first permutation leaves every index in place)
            z = rotate_blocks(z, Ri)
            continue
        perm, inverse = _indices(n, count // 2**i, size // 2, z.device)
        z = rotate_blocks(z[..., inverse], Ri)[..., perm]
    return z


def orthogonal_blocks(leaves: Leaves) -> torch.Tensor:
    theta = leaves["boft_R"]
    return cayley(0.5 * (theta - theta.transpose(-1, -2)))


def merged_weight(weight: torch.Tensor, leaves: Leaves) -> torch.Tensor:
    """W' = diag(s) W Rᵀ, (d_out, n), in the weight's dtype."""
    f = {k: v.to(weight.dtype) for k, v in leaves.items()}
    return rotate(weight, orthogonal_blocks(f), transposed=True) * f["boft_s"].reshape(-1, 1)


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    base, bias = site.base, site.base.bias
    if site.target.kind == "conv":
        W = merged_weight(base.weight(), leaves)
        b = None if bias is None else bias.to(W.dtype)
        return convolve(base, x.to(W.dtype), W, b).to(y.dtype)
    out = base(rotate(x, orthogonal_blocks(leaves)).to(x.dtype))
    # s ⊙ (out − b) + b (PEFT's order of operations) as out + (s − 1) ⊙ (out − b): exactly out at s = 1
    gain = leaves["boft_s"].reshape(-1).to(out.dtype) - 1
    return (out + (out if bias is None else out - bias.to(out.dtype)) * gain).to(y.dtype)


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    return merged_weight(weight, leaves), bias


VARIANT = Variant(
    name="boft",
    config=BOFTConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    kinds=(*LINEAR_LIKE, "conv"),
    capabilities=(
        Dense(),
        PeftExchange("boft"),
        Recipe(lr=2e-3),  # MiniLM demo, 50 steps: held-out acc 74.2% -> 84.1% (78.6% at 5e-4)
    ),
)
