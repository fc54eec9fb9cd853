"""ReFT: interventions on the hidden states a block outputs, at chosen positions (LoReFT, NoReFT, DiReFT).

    LoReFT  h' = h + Rᵀ (W h + b − R h)      R: (r, d) with orthonormal rows,  W: (r, d),  b: (r,)
    NoReFT  h' = h + Rᵀ (W h + b − R h)      R a plain projection (not kept orthonormal)
    DiReFT  h' = h + Rᵀ (W h + b)            R orthonormal rows

h is a block's output (a decoder layer: `model.layers.<i>`, counted by `layers` as the targets of every variant),
edited at the first f and last l non-padding tokens of each row (`positions="f3+l3"`; `lora_func/_positions.py`),
one intervention per block for both ends (pyreft's `share_weights=True`); the other positions keep the block's
output. In `generate`, only the prompt's positions are edited. Leaves are pyreft's given the same values: R is
`rotate_layer.weight.T` (LoReFT, DiReFT) or `proj_layer.weight` (NoReFT, `add_bias=False`); W and b are
`learned_source.weight` and `.bias`; the activation is pyreft's default, linear, and dropout 0.

Init as pyreft's: R = `orthogonal_` rows (NoReFT: a linear layer's kaiming-uniform), W and b as `nn.Linear(d, r)`
draws them. So no ReFT intervention starts at the identity (pyreft's neither): the identity invariant is waived.
The forward uses the leaf R as it is; `lf.schedule` keeps it orthonormal in training (LoReFT, DiReFT): after each
optimizer step it replaces R, in place, by the nearest matrix with orthonormal rows (the polar factor U Vᵀ of
R = U S Vᵀ), where pyreft trains through torch's orthogonal parametrization instead.

Wu et al. 2024, arXiv 2404.03592. Reference: pyreft 0.1.0 `pyreft/interventions.py` (`LoreftIntervention`,
`NoreftIntervention`, `DireftIntervention`), `pyreft/utils.py` (`get_intervention_locations`, the position caps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._config import AdapterConfig, ConfigError
from .._positions import parse_positions
from .._variant import Init, Intervention, Leaves, Positions, Recipe, Schedule, Site, Variant

INTERVENTIONS = ("loreft", "noreft", "direft")
ORTHONORMAL = ("loreft", "direft")  # the interventions whose R keeps orthonormal rows


@dataclass(frozen=True)
class ReFTConfig(AdapterConfig):
    """ReFT on the outputs of the model's blocks (all, or those in `layers`).

    positions: pyreft's string, "f<first>+l<last>": the first and last non-padding tokens of each row, each count
        capped at half the row's length ("f3+l3", "f5", "l1").
    intervention: "loreft", "noreft" or "direft" (pyreft's `LoreftIntervention`, ...).
    `r` is the intervention's rank (pyreft's `low_rank_dimension`); `alpha` is unused.
    """

    positions: str = "f3+l3"
    intervention: str = "loreft"

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            parse_positions(self.positions)
        except ValueError as e:
            raise ConfigError(f"ReFTConfig: field `positions` {e}") from None
        if self.intervention not in INTERVENTIONS:
            raise ConfigError(
                f"ReFTConfig: field `intervention` must be one of {INTERVENTIONS}, got {self.intervention!r}"
            )


def shapes(target, cfg: ReFTConfig) -> dict[str, tuple[int, ...]]:
    if cfg.r > target.d_out:
        raise ValueError(f"ReFTConfig: `r`={cfg.r} exceeds the hidden size {target.d_out} of {target.path!r}")
    return {"R": (cfg.r, target.d_out), "W": (cfg.r, target.d_out), "b": (cfg.r,)}


def create(target, cfg: ReFTConfig, init: Init) -> Leaves:
    d, r = target.d_out, cfg.r
    R = torch.empty(r, d)
    if cfg.intervention in ORTHONORMAL:
        rotate = torch.empty(d, r)  # pyreft's LowRankRotateLayer weight: orthonormal columns
        torch.nn.init.orthogonal_(rotate, generator=init.generator)
        R = rotate.t().contiguous()
    else:
        torch.nn.init.kaiming_uniform_(R, a=math.sqrt(5), generator=init.generator)
    W = torch.empty(r, d)
    torch.nn.init.kaiming_uniform_(W, a=math.sqrt(5), generator=init.generator)  # nn.Linear(d, r)
    bound = 1 / math.sqrt(d)
    b = torch.empty(r).uniform_(-bound, bound, generator=init.generator)
    return {"R": R.to(cfg.dtype), "W": W.to(cfg.dtype), "b": b.to(cfg.dtype)}


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    """Φ(h) at every position of the block output `y` (batch, seq, d); the positions are chosen around it."""
    R, W, b = leaves["R"], leaves["W"], leaves["b"]
    h = y.to(R.dtype)
    source = h @ W.t() + b  # (batch, seq, r): W h + b
    if site.config.intervention != "direft":
        source = source - h @ R.t()  # − R h
    return (h + source @ R).to(y.dtype)  # h + Rᵀ(·)


def merge(weight, bias, leaves: Leaves, site: Site):
    raise ValueError(
        f"{site.target.path!r}: ReFT edits hidden states at chosen positions, which no weight change expresses; "
        "run the adapter unmerged (lf.apply, lf.inject)"
    )


def counts(cfg: ReFTConfig) -> tuple[int, int]:
    return parse_positions(cfg.positions)


def orthonormal_rows(R: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal rows nearest to R (Frobenius): U Vᵀ of R = U S Vᵀ, computed in float64."""
    U, _, Vh = torch.linalg.svd(R.detach().double(), full_matrices=False)
    return (U @ Vh).to(R.dtype)


def schedule_state(params) -> None:
    return None


def retract(params, state, step: int, grads):
    """After an optimizer step: R of each LoReFT / DiReFT target replaced, in place, by the nearest matrix with
    orthonormal rows (so a torch.optim optimizer keeps updating the same tensor). `grads` is not needed."""
    if params.config.intervention in ORTHONORMAL:
        with torch.no_grad():
            for _, entry in params.items():
                entry["R"].copy_(orthonormal_rows(entry["R"]))
    return params, state


VARIANT = Variant(
    name="reft",
    config=ReFTConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    kinds=("block",),
    capabilities=(
        Intervention(),
        Positions(counts),
        Schedule(schedule_state, retract),
        Recipe(lr=4e-3, options=(("r", 4),)),
    ),
)
