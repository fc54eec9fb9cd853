"""VBLoRA: LoRA factors assembled from a vector bank shared by all targets, each tile a top-k mixture of its vectors.

    V (N, L)                        the bank: N = `num_vectors` vectors of length L = `vector_length`, trainable
    mix(z) = Σ_{i ∈ topk(z)} softmax(z_topk)_i · V_i      for a logit row z (N,), k = `topk`
    A[j, t·L:(t+1)·L] = mix(ℓ_A[j, t])      ℓ_A (r, d_in / L, N)   ->  A (r, d_in)
    B[t·L:(t+1)·L, j] = mix(ℓ_B[t, j])      ℓ_B (d_out / L, r, N)  ->  B (d_out, r)
    y' = y + x Aᵀ Bᵀ,    ΔW = B A   (an exact low-rank product: `LowRank`; no scale)

The bank is one trainable leaf in the shared entry, stored once; every target's gradient reaches it (a sum over
targets, as in PEFT, where one `vblora_vector_bank` parameter is shared by all layers). The logits are per-target
leaves. L must divide each target's d_in and d_out (PEFT refuses the layer otherwise; so does this file, naming it).
Not the identity at init: the bank is drawn U(−b, b) (b = `init_vector_bank_bound`) and the logits N(0, σ²)
(σ = `init_logits_std`), so ΔW starts small but non-zero, as PEFT's (a zero bank would get no gradient, and the
paper initialises the same way); invariant 2 is waived for it. `save_only_topk_weights` changes what `to_peft`
writes (PEFT's compact top-k file, for inference and merging); params always hold the full logits.
Li et al. 2024, arXiv 2405.15179. Reference: peft/tuners/vblora/layer.py (`_get_low_rank_matrix`,
`_get_lora_matrices`), model.py (`_init_vblora_vector_bank`, `_get_adapter_state_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._config import AdapterConfig, ConfigError
from .._kind import Target
from .._variant import LINEAR_LIKE, Init, Leaves, LowRank, PeftExchange, Recipe, Site, Variant
from ..kinds.linear import factored_forms


@dataclass(frozen=True)
class VBLoRAConfig(AdapterConfig):
    """VBLoRA (PEFT's `VBLoRAConfig`): `r` (4), a bank of `num_vectors` (256) vectors of `vector_length` (256, which
    must divide every target's d_in and d_out), `topk` (2) vectors mixed per tile; `init_vector_bank_bound` (0.02)
    and `init_logits_std` (0.1) as PEFT draws them. `save_only_topk_weights` (False): `to_peft` writes PEFT's top-k
    file (indices and weights) instead of the full logits. `alpha` is unused."""

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    save_only_topk_weights: bool = False
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_vectors", "vector_length", "topk"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"VBLoRAConfig: `{name}` must be a positive int, got {getattr(self, name)}")
        if self.topk > self.num_vectors:
            raise ConfigError(f"VBLoRAConfig: `topk`={self.topk} exceeds `num_vectors`={self.num_vectors}")
        if self.init_vector_bank_bound < 0 or self.init_logits_std < 0:
            raise ConfigError(
                "VBLoRAConfig: `init_vector_bank_bound` and `init_logits_std` must be >= 0, got "
                f"{self.init_vector_bank_bound} and {self.init_logits_std}"
            )


def shapes(target: Target, cfg: VBLoRAConfig) -> dict[str, tuple[int, ...]]:
    L = cfg.vector_length
    if target.d_in % L or target.d_out % L:
        raise ValueError(
            f"VBLoRAConfig: `vector_length`={L} must divide d_in and d_out of {target.path!r} "
            f"({target.d_in} -> {target.d_out})"
        )
    return {
        "vblora_logits_A": (cfg.r, target.d_in // L, cfg.num_vectors),
        "vblora_logits_B": (target.d_out // L, cfg.r, cfg.num_vectors),
    }


def create(target: Target, cfg: VBLoRAConfig, init: Init) -> Leaves:
    return {
        leaf: torch.randn(shape, generator=init.generator) * cfg.init_logits_std
        for leaf, shape in shapes(target, cfg).items()
    }


def shared_shapes(targets: tuple[Target, ...], cfg: VBLoRAConfig) -> dict[str, tuple[int, ...]]:
    return {"vblora_vector_bank": (cfg.num_vectors, cfg.vector_length)}


def create_shared(targets: tuple[Target, ...], cfg: VBLoRAConfig, init: Init) -> Leaves:
    bound = cfg.init_vector_bank_bound
    bank = torch.empty(cfg.num_vectors, cfg.vector_length)
    return {"vblora_vector_bank": torch.nn.init.uniform_(bank, -bound, bound, generator=init.generator)}


def mixed(logits: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """(…, L): each logit row's top-k bank vectors weighted by the softmax of their logits (PEFT's
    `_get_low_rank_matrix`)."""
    top, index = logits.topk(k, dim=-1)  # (…, k)
    weights = F.softmax(top, dim=-1)
    return (weights.unsqueeze(-1) * F.embedding(index, bank)).sum(-2)


def factors(leaves: Leaves, site: Site) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (d_out, r), A (r, d_in)) with ΔW = B A."""
    k, bank = site.config.topk, leaves["vblora_vector_bank"]
    logits_A, logits_B = leaves["vblora_logits_A"], leaves["vblora_logits_B"]
    A = mixed(logits_A, bank, k).flatten(-2, -1)  # (r, d_in/L, L) -> (r, d_in)
    B = mixed(logits_B, bank, k).transpose(-1, -2).flatten(-3, -2)  # (d_out/L, L, r) -> (d_out, r)
    return B, A


forward, merge = factored_forms(factors)  # y + x Aᵀ Bᵀ, W + B A


VARIANT = Variant(
    name="vblora",
    config=VBLoRAConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    shared_shapes=shared_shapes,
    create_shared=create_shared,
    kinds=LINEAR_LIKE,
    capabilities=(
        LowRank(lambda leaves, site, weight: factors(leaves, site)),
        PeftExchange("vblora"),
        # MiniLM demo, 50 steps, vectors of 32 (they must divide 384): held-out loss 0.878 -> 0.555, accuracy
        # 74.7% -> 84.1%; 2,662,400 trainable values (the logits; a top-2 file stores a fraction of them).
        Recipe(lr=3e-3, options=(("vector_length", 32),)),
    ),
)
