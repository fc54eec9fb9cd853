"""EVA: LoRA whose A starts at the principal directions of the layer's calibration inputs.

    C = (X − 1μᵀ)ᵀ (X − 1μᵀ) = Σ_i λ_i v_i v_iᵀ         (X: calibration inputs of the layer, n × d_in)
    A = [v_1 … v_r]ᵀ  (whiten: row i divided by λ_i^¼),   B = 0
    y' = y + s · (x Aᵀ) Bᵀ,   s = alpha / r                 (LoRA's forward and merge, unchanged)

The v_i are the top right singular vectors of the centred inputs (PEFT's EVA runs an incremental PCA,
which centres; `center=False` uses Xᵀ X, the raw inputs' right singular vectors). They come from the
shared calibration pass's exact Xᵀ X, where PEFT iterates a randomized incremental SVD until consecutive
estimates agree to a cosine threshold. Signs follow PEFT's `svd_flip`: each row's largest-magnitude
entry is positive. With `rho` > 1 ranks are redistributed across targets as in PEFT: a target of rank
r_t may take up to round(rho·r_t) components, and the Σ r_t components with the highest explained-
variance ratio λ_i / trace(C) win; a target that wins none gets no adapter. `init` returns the config
of what it built, as PEFT rewrites its own: `rank_pattern` / `alpha_pattern` hold the new ranks and
alpha·r_new/r_old (so the scale alpha / r of every target is kept, PEFT's `adjust_scaling_factors`),
`exclude_names` the dropped targets, and `rho` = 1; `load` and a re-`init` with it need no
redistribution, and `load` needs no data.
`whiten` divides by λ_i^¼ = √S_i, the singular values of the centred data as given; PEFT divides by its
incremental PCA's singular values, which grow as √(passes) while it cycles the data to convergence, so
PEFT's whitened rows differ from these by a per-layer factor that depends on its iteration count.
Identity at init: B = 0.
Paischer et al. 2024, arXiv 2410.07170. Reference: peft/tuners/lora/eva.py, peft/utils/incremental_pca.py.
Not supported from PEFT's EvaConfig: `tau` (there is no iteration to stop), `use_label_mask` /
`label_mask_value` (only `attention_mask` padding is dropped), `adjust_scaling_factors=False`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from .._config import AdapterConfig, config_for
from .._kind import Target
from .._variant import LINEAR_LIKE, Init, InputStats, Leaves, LowRank, Padding, Recipe, Variant
from . import lora


@dataclass(frozen=True)
class EVAConfig(AdapterConfig):
    """EVA. `r`: rank per target (the mean rank with `rho` > 1); `alpha`: LoRA's scale numerator (s = alpha / r).

    rho: >= 1; a target may take up to round(rho·r) components in the redistribution (1: none).
    whiten: divide A's row i by λ_i^¼ (PEFT's `whiten`). center: PCA of centred inputs (PEFT), or not.
    dropout: PEFT's `lora_dropout`, as for LoRA.
    Needs `calibration_data` at `init`, which returns the redistributed ranks in the config (see module doc).
    """

    rho: float = 2.0
    whiten: bool = False
    center: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not self.rho >= 1:
            raise ValueError(f"{name}: `rho` must be a number >= 1, got {self.rho!r}")
        object.__setattr__(self, "rho", float(self.rho))
        for field in ("whiten", "center"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"{name}: `{field}` must be a bool, got {getattr(self, field)!r}")


def principal_inputs(stats: InputStats, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ, Vh): eigenvalues of C, descending, and their eigenvectors as rows, signs as PEFT's `svd_flip`.

    One d_in × d_in eigendecomposition per distinct statistics, memoized on them (see `InputStats.memo`).
    """
    key = ("eva.principal_inputs", center)
    if key not in stats.memo:
        eigenvalues, vectors = torch.linalg.eigh(stats.covariance(center))  # ascending
        eigenvalues, Vh = eigenvalues.flip(0).clamp(min=0), vectors.flip(1).T
        pivot = Vh.abs().argmax(dim=1)
        signs = torch.sign(Vh[torch.arange(Vh.shape[0]), pivot])
        stats.memo[key] = (eigenvalues, Vh * signs[:, None])
    return stats.memo[key]


def allocate(found: tuple[Target, ...], cfg: EVAConfig, stats: dict[str, InputStats]):
    """PEFT's rank redistribution by explained-variance ratio; returns (config as built, targets kept)."""
    if cfg.rho == 1:
        return cfg, found
    resolved = [config_for(cfg, t.path) for t in found]
    candidates = []  # (−ratio, target index, component index)
    for i, target in enumerate(found):
        s = stats[target.path]
        eigenvalues = principal_inputs(s, cfg.center)[0]
        ratios = eigenvalues / eigenvalues.sum().clamp(min=torch.finfo(torch.float64).tiny)
        cap = min(round(resolved[i].r * cfg.rho), target.d_in, target.d_out, s.count)
        candidates += [(-ratio, i, j) for j, ratio in enumerate(ratios[:cap].tolist())]
    candidates.sort()  # best ratio first; ties by target order, then component
    ranks = [0] * len(found)
    for _, i, _ in candidates[: sum(c.r for c in resolved)]:
        ranks[i] += 1

    rank_pattern, alpha_pattern, dropped, kept = [], [], [], []
    for target, own, rank in zip(found, resolved, ranks):
        exact = re.escape(target.path)
        if rank == 0:
            dropped.append(f"^{exact}$")
            continue
        kept.append(target)
        alpha = own.alpha * rank / own.r  # keeps alpha / r: the scale does not change with the rank
        if rank != cfg.r:
            rank_pattern.append((exact, rank))
        if alpha != cfg.alpha:
            alpha_pattern.append((exact, alpha))
    built = dataclasses.replace(
        cfg,
        rho=1.0,
        rank_pattern=tuple(rank_pattern),
        alpha_pattern=tuple(alpha_pattern),
        exclude_names=cfg.exclude_names + tuple(dropped),
    )
    return built, tuple(kept)


def create(target: Target, cfg: EVAConfig, init: Init) -> Leaves:
    eigenvalues, Vh = principal_inputs(init.inputs, cfg.center)
    A = Vh[: cfg.r]
    if cfg.whiten:
        floor = max(eigenvalues[0].item() * 1e-12, 1e-300)  # a zero-variance direction must not divide by 0
        A = A / eigenvalues[: cfg.r].clamp(min=floor)[:, None] ** 0.25
    return {"A": A.to(torch.float32), "B": torch.zeros(target.d_out, cfg.r)}


VARIANT = Variant(
    name="eva",
    config=EVAConfig,
    shapes=lora.shapes,
    create=create,
    forward=lora.forward,
    inference=lora.inference,
    merge=lora.merge,
    calibrated=True,
    allocate=allocate,
    kinds=LINEAR_LIKE,
    capabilities=(
        LowRank(lora.low_rank_factors),
        Padding(axes=(("A", 0), ("B", 1))),
        Recipe(lr=1e-3),
    ),
)
