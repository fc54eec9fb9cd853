"""MiSS: one shared block added to every r-column shard of W (Matrix Shard Sharing; formerly "Bone").

    ΔW[:, k·r + j] = Mᵀ[:, j]      for every shard k of r input columns (the last one cut short where r ∤ d_in)
    y' = y + fold(x) M,            fold(x)_j = Σ_k x[k·r + j]   (x zero-padded to a multiple of r; PEFT's forward)

M (r, d_out) is the leaf `miss_block`. With `init_weights="mini"` it is (r, mini_r) and repeated d_out / mini_r
times along the outputs (fewer values; d_out must be a multiple of `mini_r`). ΔW is low rank, exactly:

    ΔW = Mᵀ S,     S (r, d_in), S[j, i] = 1 where i mod r = j      (rank <= r)

which adapter arithmetic uses. Zero-padding M's rows does not keep ΔW (the shards would change), so no `Padding`.
PEFT's `init_weights="bat"` (a block update that multiplies W's own blocks, W' = W + W_blocks M + M) is not
offered. Identity at init: M = 0 (PEFT's `init_weights=True`); `init_weights=False` draws M kaiming-uniform.
Kang & Yin 2024, arXiv 2409.15371. Reference: peft/tuners/miss/layer.py (`MissLinear.forward`,
`get_delta_weight_miss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._config import AdapterConfig, ConfigError
from .._kind import Target
from .._variant import LINEAR_LIKE, Init, Leaves, LowRank, PeftExchange, Recipe, Site, Variant

INITS = (True, False, "mini")


@dataclass(frozen=True)
class MiSSConfig(AdapterConfig):
    """MiSS (PEFT's `MissConfig`): `r` (PEFT's default 64) the shard width along the inputs, r <= d_in; `alpha` is
    unused. `init_weights`: True (M = 0, the identity), False (M at random), or "mini" (M of (r, `mini_r`),
    repeated along the outputs; d_out must be a multiple of `mini_r`). PEFT's "bat" is not offered."""

    r: int = 64
    mini_r: int = 1
    init_weights: bool | str = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in INITS:
            bat = self.init_weights == "bat"
            why = " (its update multiplies W's blocks, which lora_func's MiSS does not offer)" if bat else ""
            raise ConfigError(
                f"MiSSConfig: `init_weights` must be true, false or 'mini', got {self.init_weights!r}{why}"
            )
        if self.mini_r <= 0:
            raise ConfigError(f"MiSSConfig: `mini_r` must be a positive int, got {self.mini_r}")


def shapes(target: Target, cfg: MiSSConfig) -> dict[str, tuple[int, ...]]:
    if cfg.r > target.d_in:
        raise ValueError(f"MiSSConfig: `r`={cfg.r} exceeds d_in={target.d_in} of {target.path!r}")
    if cfg.init_weights != "mini":
        return {"miss_block": (cfg.r, target.d_out)}
    if target.d_out % cfg.mini_r:
        raise ValueError(
            f"MiSSConfig: `mini_r`={cfg.mini_r} does not divide d_out={target.d_out} of {target.path!r} "
            "(PEFT requires it)"
        )
    return {"miss_block": (cfg.r, cfg.mini_r)}


def create(target: Target, cfg: MiSSConfig, init: Init) -> Leaves:
    block = torch.zeros(shapes(target, cfg)["miss_block"])
    if cfg.init_weights is False:
        torch.nn.init.kaiming_uniform_(block, a=math.sqrt(5), generator=init.generator)
    return {"miss_block": block}


def block(leaves: Leaves, d_out: int) -> torch.Tensor:
    """M as (r, d_out): the leaf, or a "mini" leaf (r, mini_r) repeated along the outputs (PEFT's `repeat`)."""
    M = leaves["miss_block"]
    return M if M.shape[1] == d_out else M.repeat(1, d_out // M.shape[1])


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    # In the wider of the input's and the leaf's dtypes: the fold sums d_in / r inputs (PEFT: in the leaf's).
    dtype = torch.promote_types(x.dtype, leaves["miss_block"].dtype)
    M = block(leaves, site.target.d_out).to(dtype)
    r = M.shape[0]
    if x.shape[-1] % r:  # F.pad copies x even by zero columns
        x = F.pad(x, (0, r - x.shape[-1] % r))
    x = x.to(dtype)
    return y + (x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(dim=-2) @ M).to(y.dtype)


def low_rank_factors(leaves: Leaves, site: Site, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(Mᵀ (d_out, r), S (r, d_in)): ΔW = Mᵀ S, S summing each input column into its shard position."""
    M = block(leaves, site.target.d_out)
    r, d_in = M.shape[0], site.target.d_in
    S = torch.arange(d_in, device=M.device) % r == torch.arange(r, device=M.device)[:, None]
    return M.t(), S.to(M.dtype)


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    B, A = low_rank_factors({k: v.to(weight.dtype) for k, v in leaves.items()}, site, None)
    return weight + B @ A, bias


VARIANT = Variant(
    name="miss",
    config=MiSSConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    kinds=LINEAR_LIKE,
    capabilities=(
        LowRank(low_rank_factors),
        PeftExchange("miss"),
        Recipe(lr=3e-4),  # MiniLM demo, 50 steps: held-out loss 0.879 -> 0.446 (1e-3: 0.499; 3e-3 diverges)
    ),
)
