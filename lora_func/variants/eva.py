"""EVA: LoRA whose A starts at the principal directions of the layer's calibration inputs.

    C = (X − 1μᵀ)ᵀ (X − 1μᵀ) = Σ_i λ_i v_i v_iᵀ         (X: calibration inputs of the layer, n × d_in)
    A = [v_1 … v_r]ᵀ  (whiten: row i divided by λ_i^¼),   B = 0
    y' = y + s · (x Aᵀ) Bᵀ,   s = alpha / r                 (LoRA's forward, unchanged)

The v_i are the top right singular vectors of the centred inputs (PEFT's EVA runs an incremental PCA,
which centres; `center=False` uses Xᵀ X, the raw inputs' right singular vectors). They come from the
shared calibration pass's exact Xᵀ X, where PEFT iterates an approximate incremental SVD to a
cosine-similarity threshold. Signs follow PEFT's `svd_flip`: each row's largest-magnitude entry is
positive. With `rho` > 1, ranks are redistributed across targets as in PEFT: each target may take up
to round(rho·r) components, and the r·(number of targets) components with the highest explained-
variance ratio λ_i / trace(C) win; a target that wins none gets no adapter. The ranks found are
recorded in the returned config (`ranks`), so `load` and a re-`init` need no data to know the shapes.
The scale stays alpha / r on every target (PEFT's default `adjust_scaling_factors=True`).
Identity at init: B = 0.
Paischer et al. 2024, arXiv 2410.07170. Reference: peft/tuners/lora/eva.py, peft/utils/incremental_pca.py.
Not supported from PEFT's EvaConfig: `tau` (there is no iteration to stop), `use_label_mask` /
`label_mask_value` (only `attention_mask` padding is dropped), `adjust_scaling_factors=False`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .._config import AdapterConfig
from .._targets import Target
from .._variant import Init, InputStats, Leaves, Variant
from . import lora


@dataclass(frozen=True)
class EVAConfig(AdapterConfig):
    """EVA. `r`: rank per target (the mean rank with `rho` > 1); `alpha`: LoRA's scale numerator (s = alpha / r).

    rho: >= 1; each target may take up to round(rho·r) components in the redistribution (1: none).
    whiten: divide A's row i by λ_i^¼ (PEFT's `whiten`). center: PCA of centred inputs (PEFT), or not.
    ranks: ((path, rank), ...) for every selected target, filled in by `init` when rho > 1; given, `init`
        uses these ranks instead of redistributing (rank 0: no adapter on that target).
    Needs `calibration_data` at `init`.
    """

    rho: float = 2.0
    whiten: bool = False
    center: bool = True
    ranks: tuple[tuple[str, int], ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not self.rho >= 1:
            raise ValueError(f"{name}: `rho` must be a number >= 1, got {self.rho!r}")
        object.__setattr__(self, "rho", float(self.rho))
        for field in ("whiten", "center"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"{name}: `{field}` must be a bool, got {getattr(self, field)!r}")
        if self.ranks is not None:
            try:
                ranks = tuple((path, rank) for path, rank in self.ranks)
            except (TypeError, ValueError):
                raise ValueError(f"{name}: `ranks` must be pairs (path, rank), got {self.ranks!r}") from None
            for path, rank in ranks:
                if not isinstance(path, str) or isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                    raise ValueError(f"{name}: `ranks` entry ({path!r}, {rank!r}) is not (str, int >= 0)")
            if len({path for path, _ in ranks}) != len(ranks):
                raise ValueError(f"{name}: `ranks` names a path twice")
            object.__setattr__(self, "ranks", ranks)


def rank_of(target: Target, cfg: EVAConfig) -> int:
    if cfg.ranks is None:
        return cfg.r
    ranks = dict(cfg.ranks)
    if target.path not in ranks:
        raise ValueError(f"EVAConfig: `ranks` has no entry for {target.path!r}")
    return ranks[target.path]


def shapes(target: Target, cfg: EVAConfig) -> dict[str, tuple[int, ...]]:
    r = rank_of(target, cfg)
    limit = min(target.d_in, target.d_out)
    if r > limit:
        raise ValueError(f"EVAConfig: rank {r} exceeds min(d_in, d_out)={limit} of {target.path!r}")
    return {"A": (r, target.d_in), "B": (target.d_out, r)}


def principal_inputs(stats: InputStats, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ, Vh): eigenvalues of C, descending, and their eigenvectors as rows, signs as PEFT's `svd_flip`."""
    eigenvalues, vectors = torch.linalg.eigh(stats.covariance(center))  # ascending
    eigenvalues, Vh = eigenvalues.flip(0).clamp(min=0), vectors.flip(1).T
    pivot = Vh.abs().argmax(dim=1)
    signs = torch.sign(Vh[torch.arange(Vh.shape[0]), pivot])
    return eigenvalues, Vh * signs[:, None]


def allocate(found: tuple[Target, ...], cfg: EVAConfig, stats: dict[str, InputStats]):
    """Per-target ranks: PEFT's redistribution by explained-variance ratio (see the module docstring)."""
    if cfg.ranks is not None:
        for target in found:
            rank_of(target, cfg)  # every selected target needs an entry
        return cfg, tuple(t for t in found if rank_of(t, cfg) > 0)
    if cfg.rho == 1:
        return cfg, found
    cap = round(cfg.r * cfg.rho)
    ratios: dict[int, torch.Tensor] = {}  # targets reading the same tensor share their statistics
    candidates = []  # (ratio, target index, component index)
    for i, target in enumerate(found):
        s = stats[target.path]
        if id(s.gram) not in ratios:
            eigenvalues = principal_inputs(s, cfg.center)[0]
            ratios[id(s.gram)] = eigenvalues / eigenvalues.sum().clamp(min=torch.finfo(torch.float64).tiny)
        ratio = ratios[id(s.gram)]
        for j in range(min(cap, target.d_in, target.d_out, s.count)):
            candidates.append((-ratio[j].item(), i, j))
    candidates.sort()  # best ratio first; ties by target order, then component
    counts = [0] * len(found)
    for _, i, _ in candidates[: cfg.r * len(found)]:
        counts[i] += 1
    ranks = tuple((t.path, n) for t, n in zip(found, counts))
    return dataclasses.replace(cfg, ranks=ranks), tuple(t for t, n in zip(found, counts) if n > 0)


def create(target: Target, cfg: EVAConfig, init: Init) -> Leaves:
    r = rank_of(target, cfg)
    eigenvalues, Vh = principal_inputs(init.inputs, cfg.center)
    A = Vh[:r]
    if cfg.whiten:
        floor = max(eigenvalues[0].item() * 1e-12, 1e-300)  # a zero-variance direction must not divide by 0
        A = A / eigenvalues[:r].clamp(min=floor)[:, None] ** 0.25
    return {"A": A.to(torch.float32), "B": torch.zeros(target.d_out, r)}


VARIANT = Variant(
    name="eva",
    config=EVAConfig,
    shapes=shapes,
    create=create,
    forward=lora.forward,
    merge=lora.merge,
    calibrated=True,
    allocate=allocate,
)
