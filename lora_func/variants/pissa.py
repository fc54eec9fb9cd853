"""PiSSA: LoRA whose A, B start at the principal singular directions of W, without rewriting W.

    W = U S Vᵀ,  A0 = √(S_r / s) V_rᵀ,  B0 = U_r √(S_r / s)          (PEFT's factors, s = alpha / r)
    y' = y + s · (B A − B0 A0) x,   A, B train; A0, B0 are frozen copies of the initial factors

Identity at init: A = A0, B = B0. PEFT subtracts s·B0 A0 from the weight instead; keeping the frozen
factors leaves the model untouched and works on quantized bases (SVD of the dequantized weight).
Meng et al. 2024, arXiv 2404.02948. Reference: peft/tuners/lora/layer.py (`pissa_init`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._config import AdapterConfig
from .._variant import LINEAR_LIKE, Init, Leaves, LowRank, Padding, PeftExchange, Recipe, Site, Variant
from ..kinds.linear import low_rank
from . import lora


@dataclass(frozen=True)
class PiSSAConfig(AdapterConfig):
    """PiSSA. `niter=None`: exact SVD; an int: `torch.svd_lowrank` with that many subspace iterations.
    `dropout`: PEFT's `lora_dropout`."""

    niter: int | None = None
    use_rslora: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.niter is not None and (
            isinstance(self.niter, bool) or not isinstance(self.niter, int) or self.niter < 0
        ):
            raise ValueError(f"PiSSAConfig: `niter` must be None or an int >= 0, got {self.niter!r}")


def shapes(target, cfg) -> dict[str, tuple[int, ...]]:
    low = lora.shapes(target, cfg)
    return {**low, "A0": low["A"], "B0": low["B"]}


def principal_factors(
    weight: torch.Tensor, cfg: PiSSAConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) with s · B0 A0 = the rank-r truncated SVD of `weight` (randomized when `cfg.niter` is set)."""
    if cfg.niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, : cfg.r], S[: cfg.r], Vh[: cfg.r]
    else:
        # svd_lowrank draws from the global RNG: seed it from `generator` (if any) without disturbing it.
        with torch.random.fork_rng(devices=[]):
            if generator is not None:
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            U, S, V = torch.svd_lowrank(weight, cfg.r, niter=cfg.niter)
        Vh = V.t()
    root = torch.sqrt(S / lora.scale(cfg))
    return root[:, None] * Vh, U * root[None, :]


def create(target, cfg: PiSSAConfig, init: Init) -> Leaves:
    A0, B0 = principal_factors(init.weight(), cfg, init.generator)
    return {"A": A0.clone(), "B": B0.clone(), "A0": A0, "B0": B0}


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    # B A − B0 A0 = B (A − A0) + (B − B0) A0: one rank-2r product, and exactly zero while A = A0, B = B0.
    A = torch.cat([leaves["A"] - leaves["A0"], leaves["A0"]])
    B = torch.cat([leaves["B"], leaves["B"] - leaves["B0"]], dim=1)
    return y + low_rank(lora.input_dropout(x, site), A, B, lora.scale(site.config)).to(y.dtype)


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    f = {k: v.to(weight.dtype) for k, v in leaves.items()}
    return weight + lora.scale(site.config) * (f["B"] @ f["A"] - f["B0"] @ f["A0"]), bias


def low_rank_factors(leaves: Leaves, site: Site, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """s (B A − B0 A0) = s [B, B − B0] [A − A0; A0], rank 2r, as the forward: exact zeros while A = A0, B = B0."""
    A = torch.cat([leaves["A"] - leaves["A0"], leaves["A0"]])  # (2r, d_in)
    B = torch.cat([leaves["B"], leaves["B"] - leaves["B0"]], dim=1)  # (d_out, 2r)
    return lora.scale(site.config) * B, A


VARIANT = Variant(
    name="pissa",
    config=PiSSAConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    frozen=("A0", "B0"),
    kinds=LINEAR_LIKE,
    capabilities=(
        LowRank(low_rank_factors),
        Padding(axes=(("A", 0), ("B", 1), ("A0", 0), ("B0", 1)), scaled=("B", "B0")),
        PeftExchange("pissa"),
        Recipe(lr=5e-4),  # its factors are large (√ of the top singular values): a smaller lr than LoRA's
    ),
)
