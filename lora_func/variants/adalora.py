"""AdaLoRA: LoRA in SVD form, with a rank budget that a training-time allocator spreads over the layers.

    y' = y + α · B ((A ⊙ (E ⊙ m)) x) / (r₀ + 1e-5)     A (r₀, d_in), E (r₀, 1), B (d_out, r₀), m (r₀, 1)

Leaves `lora_A`, `lora_E`, `lora_B` (PEFT's names): A and B hold the right and left "singular vectors", E the
"singular values" (one per rank, broadcast over A's rows). r₀ = `init_r`; the divisor r₀ + 1e-5 is PEFT's `ranknum`
(fixed at init_r, also after ranks are removed), α = `alpha` (PEFT's `lora_alpha`, its `scaling`). `m` is the
frozen leaf `rank_mask`: 1 at init, 0 at the ranks the allocator removed for good at its final allocation (PEFT's
final `rank_pattern`: PEFT drops those ranks from the layer). Identity at init: E = 0 (A, B ~ N(0, 0.02²), PEFT's
`reset_lora_parameters`), so ΔW is exactly 0. On linear-like layers (nn.Linear, bitsandbytes, transformers Conv1D)
and convolutions. On a convolution d_in is the kernel's fan-in d_in / groups · ∏kernel: ΔW = α B (A ⊙ (E ⊙ m)) /
(r₀ + 1e-5) is the flattened kernel (d_out, d_in / groups · ∏kernel), and the layer's own convolution (its stride,
padding and padding mode, dilation, groups) applies it, y' = y + ΔW ⋆ x, as PEFT's `SVDConv2d.forward` does.

The rank allocator, `lf.schedule` (PEFT's `RankAllocator.update_and_allocate`, called after each optimizer step):
for every element p of A, E, B, the importance I = |p · ∂L/∂p| is smoothed, Ī ← β₁ Ī + (1 − β₁) I, and its
uncertainty Ū ← β₂ Ū + (1 − β₂) |I − Ī|; rank i of a target scores S_i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)
with s = Ī · Ū. The budget b(t), the ranks kept in total over n targets, is n·r₀ up to step `tinit`, then falls
cubically, b = ⌊(n·r₀ − n·r_T)(1 − (t − tinit)/(T − tfinal − tinit))³ + n·r_T⌋, to n·r_T (r_T = `target_r`) at
step T − tfinal (T = `total_step`). Every `deltaT` steps in between, the ranks scoring at most the (n·r₀ − b)-th
smallest score get E_i = 0 (in place: they may grow back until the next allocation). At step T − tfinal the final
allocation sets `rank_mask`; after it, the removed ranks' E is zeroed after every step, as PEFT does.
`lf.regularizer` is PEFT's orthogonality term, `orth_reg_weight` · mean over the targets' A and B of
‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F, which PEFT adds to the loss in `AdaLoraModel.forward`.

Forgetting the allocator (peft #3373: training then silently is plain LoRA) cannot pass unnoticed here: with
`total_step` set, an `lf.apply` / `lf.inject` with grad enabled refuses leaves that an optimizer changed after
`lf.schedule` last ran (or since an earlier call, never scheduled), and, on a model in training mode, leaves that
neither `lf.schedule_state` nor `lf.schedule` ever saw (`guard` below). Under HF Trainer the allocator runs in a
`TrainerCallback.on_optimizer_step` (after the step, before `zero_grad()`; docs/guides/training.md).
`total_step=None` (the default, unlike PEFT, where it is required) trains at a fixed rank, with no allocator.

Zhang et al. 2023, arXiv 2303.10512. Reference: peft/tuners/adalora/layer.py (`SVDLinear`, `RankAllocator`),
model.py (`AdaLoraModel.forward`, `update_and_allocate`), config.py, bnb.py (`SVDLinear4bit`,
`SVDLinear8bitLt`); layer.py's `SVDConv2d` for convolutions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from .. import _torch_private as private
from .._config import AdapterConfig, ConfigError, normalize
from .._kind import Target
from .._variant import LINEAR_LIKE, Init, Leaves, LowRank, PeftExchange, Recipe, Regularizer, Schedule, Site, Variant
from ..kinds.conv import convolve, fan_in
from .lora import input_dropout

PEFT_INIT_R = 12  # PEFT's `init_r` default
TRIPLET = ("lora_A", "lora_E", "lora_B")  # the trainable leaves, PEFT's names
# Attribute on a `lora_E` tensor: (its `_version`, whether lf.schedule set it) when the allocator or a call saw it.
SEEN = "_lora_func_adalora_seen"


@dataclass(frozen=True)
class AdaLoRAConfig(AdapterConfig):
    """AdaLoRA (PEFT's `AdaLoraConfig`, same field names and defaults).

    init_r: the ranks every target starts with (PEFT's default 12). `r` is the same number: give either (a
        conflicting pair is refused); neither gives 12.
    target_r: the average rank the allocator keeps at the end (its budget is target_r × the number of targets).
    tinit, tfinal, deltaT, total_step: the allocator's phases: `tinit` steps at full rank, the budget falling
        cubically until step `total_step - tfinal`, a new allocation every `deltaT` steps, then `tfinal` steps at
        the final ranks. `total_step=None` (PEFT requires a value): no allocator, training at a fixed rank.
    beta1, beta2: the EMA factors of the importance and its uncertainty.
    orth_reg_weight: the weight of `lf.regularizer`'s orthogonality term.
    alpha: PEFT's `lora_alpha` (default 8); the update is scaled by alpha / (init_r + 1e-5).
    dropout: PEFT's `lora_dropout`, on the adapter's input in training mode.
    `rank_pattern` / `alpha_pattern` (LoRA's per-target overrides) are refused: PEFT's AdaLoRA has one init_r and
    lora_alpha for all targets, and its `rank_pattern` is the allocator's result (the `rank_mask` leaves here).
    """

    RANK_ALIASES: ClassVar[tuple[str, ...]] = ("init_r",)  # `r` under PEFT's name (`lf.stack` compares ranks)

    r: int | None = None
    alpha: float = 8.0
    target_r: int = 8
    init_r: int | None = None
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 - PEFT's name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.init_r is not None:  # its own type error first, not one about `r`, which it sets
            normalize(self.init_r, int, "init_r", "AdaLoRAConfig")
        given = (self.r, self.init_r)
        rank = next((v for v in (self.init_r, self.r) if v is not None), PEFT_INIT_R)
        object.__setattr__(self, "r", rank)
        object.__setattr__(self, "init_r", rank)
        super().__post_init__()  # types checked; `r` (= init_r) must be a positive int
        if None not in given and given[0] != given[1]:
            raise ConfigError(
                f"AdaLoRAConfig: `r`={given[0]!r} and `init_r`={given[1]!r} differ; `r` is `init_r` here (the ranks "
                "every target starts with): give one of them"
            )
        problems = []
        if self.rank_pattern or self.alpha_pattern:
            problems.append("`rank_pattern` / `alpha_pattern` are not supported (one init_r and alpha for all targets)")
        if not self.alpha > 0:
            problems.append(f"`alpha` must be > 0, got {self.alpha!r}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            problems.append(f"`beta1` and `beta2` must be in (0, 1), got {self.beta1!r} and {self.beta2!r}")
        if self.orth_reg_weight < 0:
            problems.append(f"`orth_reg_weight` must be >= 0, got {self.orth_reg_weight!r}")
        if min(self.tinit, self.tfinal, self.target_r) < 0 or self.deltaT < 1:
            problems.append(
                f"`tinit`, `tfinal`, `target_r` must be >= 0 and `deltaT` >= 1, got {self.tinit}, {self.tfinal}, "
                f"{self.target_r}, {self.deltaT}"
            )
        if self.total_step is not None:
            if self.total_step <= 0:
                problems.append(f"`total_step` must be a positive int or None, got {self.total_step!r}")
            elif self.tinit >= self.total_step - self.tfinal:
                problems.append(
                    f"`tinit`={self.tinit} >= `total_step` - `tfinal` = {self.total_step - self.tfinal}: no budgeting "
                    "phase is left (PEFT refuses it too)"
                )
        if problems:
            raise ConfigError("AdaLoRAConfig: " + "; ".join(problems))


def columns(target: Target) -> int:
    """A's columns: d_in, or a convolution's fan-in d_in / groups · ∏kernel (PEFT's `SVDConv2d` with groups 1)."""
    return fan_in(target) if target.kind == "conv" else target.d_in


def shapes(target: Target, cfg: AdaLoRAConfig) -> dict[str, tuple[int, ...]]:
    r = cfg.init_r
    return {"lora_A": (r, columns(target)), "lora_E": (r, 1), "lora_B": (target.d_out, r), "rank_mask": (r, 1)}


def create(target: Target, cfg: AdaLoRAConfig, init: Init) -> Leaves:
    r = cfg.init_r
    A = torch.empty(r, columns(target)).normal_(0.0, 0.02, generator=init.generator)
    B = torch.empty(target.d_out, r).normal_(0.0, 0.02, generator=init.generator)
    leaves = {"lora_A": A, "lora_E": torch.zeros(r, 1), "lora_B": B, "rank_mask": torch.ones(r, 1)}
    return {k: v.to(cfg.dtype) for k, v in leaves.items()}


def scaling(cfg: AdaLoRAConfig) -> float:
    return cfg.alpha


def ranknum(cfg: AdaLoRAConfig, like: torch.Tensor) -> torch.Tensor:
    """PEFT's divisor `ranknum + 1e-5`: a float32 tensor of shape (1,) holding init_r, plus 1e-5 in float32."""
    return torch.full((1,), float(cfg.init_r), dtype=torch.float32, device=like.device) + 1e-5


def _values(leaves: Leaves) -> torch.Tensor:
    """A ⊙ (E ⊙ m), (r₀, d_in): the removed ranks' rows are 0."""
    return leaves["lora_A"] * (leaves["lora_E"] * leaves["rank_mask"])


def forward(x: torch.Tensor, y: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
    cfg = site.config
    A = leaves["lora_A"]
    h = input_dropout(x, site).to(A.dtype)
    if site.target.kind == "conv":  # PEFT's `SVDConv2d.forward`: ΔW as a kernel, convolved as the layer does
        kernel = leaves["lora_B"] @ _values(leaves) * scaling(cfg) / ranknum(cfg, A)
        return y + convolve(site.base, h, kernel).to(y.dtype)
    delta = (h @ _values(leaves).t() @ leaves["lora_B"].t()) * scaling(cfg) / ranknum(cfg, A)  # PEFT's order
    return y + delta.to(y.dtype)


def merge(weight: torch.Tensor, bias, leaves: Leaves, site: Site):
    cfg = site.config
    leaves = {k: v.to(weight.dtype) for k, v in leaves.items()}
    delta = leaves["lora_B"] @ _values(leaves) * scaling(cfg) / ranknum(cfg, weight)  # PEFT's `get_delta_weight`
    return weight + delta.to(weight.dtype), bias


def low_rank_factors(leaves: Leaves, site: Site, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW = (α B / (r₀ + 1e-5)) (A ⊙ E ⊙ m)."""
    cfg = site.config
    B = leaves["lora_B"]
    return (B * scaling(cfg) / ranknum(cfg, B)).to(B.dtype), _values(leaves)


# -- the orthogonality term ----------------------------------------------------------------------------------------


def orthogonality(params) -> torch.Tensor:
    """`orth_reg_weight` · mean over targets of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F (PEFT's `AdaLoraModel.forward`)."""
    cfg = params.config
    total, count = 0, 0
    for target in params.targets:
        entry = params[target.path]
        for cov in (entry["lora_A"] @ entry["lora_A"].t(), entry["lora_B"].t() @ entry["lora_B"]):
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    return cfg.orth_reg_weight * (total / count)


# -- the rank allocator --------------------------------------------------------------------------------------------


class AllocatorState(NamedTuple):
    """`lf.schedule`'s state for AdaLoRA, a pytree of tensors: per target and leaf of A, E, B the smoothed importance
    Ī (`exp_avg_ipt`) and its uncertainty Ū (`exp_avg_unc`), empty before the first step and after the final
    allocation (PEFT resets them there); `step` the last step seen (-1: none); `final` whether the final allocation
    is made (the `rank_mask` leaves hold it)."""

    exp_avg_ipt: dict[str, dict[str, torch.Tensor]]
    exp_avg_unc: dict[str, dict[str, torch.Tensor]]
    step: int
    final: bool


def _mark(params) -> None:
    """Record, on each target's `lora_E` tensor, its version now: `guard` compares it at the next training call."""
    for target in params.targets:
        E = private.unwrapped(params[target.path]["lora_E"])
        E.__dict__[SEEN] = (E._version, True)


def allocator_state(params) -> AllocatorState:
    """The state before the first step; marks the leaves as seen by the allocator (see `guard`)."""
    cfg = params.config
    final = any(bool((params[t.path]["rank_mask"] == 0).any()) for t in params.targets)
    if cfg.total_step is not None:
        if cfg.target_r >= cfg.init_r:
            raise ValueError(
                f"schedule_state: AdaLoRAConfig `target_r`={cfg.target_r} must be below `init_r`={cfg.init_r}: the "
                "allocator removes ranks down to target_r per target on average (PEFT fails at its first allocation)"
            )
        _mark(params)
    return AllocatorState({}, {}, -1, final)


def budget_schedule(cfg: AdaLoRAConfig, targets: int, step: int) -> tuple[int, bool]:
    """(ranks kept in total, whether to allocate at `step`): PEFT's `RankAllocator.budget_schedule`."""
    init_bgt, target_bgt = cfg.init_r * targets, cfg.target_r * targets
    if step <= cfg.tinit:
        return init_bgt, False
    if step > cfg.total_step - cfg.tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
    return int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt), step % cfg.deltaT == 0


def _smoothed(params, state: AllocatorState, grads) -> tuple[dict, dict]:
    """Ī and Ū after this step's |p · ∂L/∂p| (PEFT's `update_ipt`, the same expressions)."""
    cfg, ipt_avg, unc_avg = params.config, {}, {}
    for target in params.targets:
        path = target.path
        ipt_avg[path], unc_avg[path] = {}, {}
        for leaf in TRIPLET:
            p = params[path][leaf].detach()
            grad = grads[path][leaf] if path in grads and leaf in grads[path] else None
            if grad is None:
                raise ValueError(
                    f"schedule: no gradient for {path}.{leaf}: call lf.schedule after backward() and before "
                    "zero_grad() (a torch.optim loop), or pass `grads=` (the torch.func style)"
                )
            ipt = (p * grad.detach()).abs()
            old_ipt = state.exp_avg_ipt.get(path, {}).get(leaf, torch.zeros_like(p))
            old_unc = state.exp_avg_unc.get(path, {}).get(leaf, torch.zeros_like(p))
            new_ipt = cfg.beta1 * old_ipt + (1 - cfg.beta1) * ipt
            ipt_avg[path][leaf] = new_ipt
            unc_avg[path][leaf] = cfg.beta2 * old_unc + (1 - cfg.beta2) * (ipt - new_ipt).abs()
    return ipt_avg, unc_avg


def _scores(params, state: AllocatorState) -> dict[str, torch.Tensor]:
    """Per target, the (r₀,) scores S_i = s(E_i) + (mean_j s(A_ij) + mean_j s(B_ji)), s = Ī · Ū, summed in PEFT's
    order (`mask_to_budget`, `_combine_ipt`)."""
    out = {}
    for target in params.targets:
        path = target.path
        score = {leaf: state.exp_avg_ipt[path][leaf] * state.exp_avg_unc[path][leaf] for leaf in TRIPLET}
        by_A = torch.mean(score["lora_A"], dim=1, keepdim=True)
        by_B = torch.mean(score["lora_B"], dim=0, keepdim=False).view(-1, 1)
        out[path] = score["lora_E"].view(-1) + torch.cat([by_A, by_B], dim=1).sum(dim=1, keepdim=False).view(-1)
    return out


def _allocate(params, state: AllocatorState, budget: int) -> dict[str, torch.Tensor]:
    """Zero E at the ranks scoring at most the (n·r₀ − budget)-th smallest score (PEFT's `mask_to_budget`); returns
    the kept ranks per target, (r₀, 1) booleans."""
    scores = _scores(params, state)
    removed = params.config.init_r * len(params.targets) - budget
    threshold = torch.kthvalue(torch.cat(list(scores.values())), k=removed)[0].item()
    kept = {}
    for path, score in scores.items():
        drop = score.view(-1, 1) <= threshold
        params[path]["lora_E"].masked_fill_(drop, 0.0)
        kept[path] = ~drop
    return kept


def allocate(params, state: AllocatorState, step: int, grads) -> tuple[Any, AllocatorState]:
    """One step of PEFT's `AdaLoraModel.update_and_allocate`, after the optimizer step; E and, at the final
    allocation, `rank_mask` change in place (a torch.optim optimizer keeps updating the same tensors)."""
    cfg = params.config
    if cfg.total_step is None:
        raise ValueError(
            "schedule: AdaLoRAConfig has `total_step=None`, so no rank allocator: set `total_step` (the number of "
            "training steps, as PEFT requires) to train with it, or train at a fixed rank without lf.schedule"
        )
    if step <= state.step:
        raise ValueError(
            f"schedule: step {step} after step {state.step}: call it once per optimizer step, with increasing steps"
        )
    end = cfg.total_step - cfg.tfinal
    with torch.no_grad():
        if step < end:
            ipt, unc = _smoothed(params, state, grads)
            state = AllocatorState(ipt, unc, step, state.final)
            budget, allocate_now = budget_schedule(cfg, len(params.targets), step)
            if allocate_now:
                _allocate(params, state, budget)
        elif step == end or not state.final:
            if not state.exp_avg_ipt:
                raise ValueError(
                    f"schedule: the final allocation (step {end} = `total_step` - `tfinal`) needs the importance "
                    f"of earlier steps, and none was seen (first step seen: {step})"
                )
            budget, _ = budget_schedule(cfg, len(params.targets), end)
            for path, kept in _allocate(params, state, budget).items():
                params[path]["rank_mask"].copy_(kept.to(params[path]["rank_mask"].dtype))
            state = AllocatorState({}, {}, step, True)
        else:  # PEFT's `mask_using_rank_pattern`: the removed ranks stay at E = 0
            for target in params.targets:
                entry = params[target.path]
                entry["lora_E"].masked_fill_(entry["rank_mask"] == 0, 0.0)
            state = state._replace(step=step)
    _mark(params)
    return params, state


def guard(params, caller: str, training: bool) -> None:
    """Refuse a call with grad enabled, when `total_step` is set, on leaves that an optimizer changed after
    `lf.schedule` last ran (or, never scheduled, since an earlier such call), or, with the model in training mode,
    on leaves the allocator never saw: that is training without the allocator, which would silently be plain LoRA
    (peft #3373). Reads one attribute and one version counter per target (an evaluation with grad enabled, on a
    model in eval mode, only records them)."""
    cfg = params.config
    if cfg.total_step is None or torch.compiler.is_compiling():
        return
    for target in params.targets:
        leaf = params[target.path]["lora_E"]
        E = private.unwrapped(leaf)
        if E is leaf and not E.requires_grad:
            continue  # not trained here
        seen = E.__dict__.get(SEEN)
        if seen is None and not training:
            E.__dict__[SEEN] = (E._version, False)  # an evaluation: remembered, so that an optimizer step shows
            continue
        if seen is not None and seen[0] == E._version:
            continue
        if seen is None:
            why = "they were never given to lf.schedule_state or lf.schedule"
        elif seen[1]:
            why = "an optimizer step changed them after lf.schedule last ran"
        else:
            why = "an optimizer step changed them, and lf.schedule never ran"
        raise RuntimeError(
            f"{caller}: AdaLoRA with `total_step`={cfg.total_step} trains with its rank allocator, and the leaves of "
            f"{target.path!r} were not scheduled: {why}. Call `state = lf.schedule_state(params)` before training "
            "and `params, state = lf.schedule(params, state, step)` after every optimizer step (torch.func style: "
            "with `grads=`); without it no rank is ever removed and training is plain LoRA. Under HF Trainer, a "
            'TrainerCallback does it in `on_optimizer_step` (docs/guides/training.md, "AdaLoRA under Trainer"). '
            "To train at a fixed rank, without the allocator, use `total_step=None`."
        )


VARIANT = Variant(
    name="adalora",
    config=AdaLoRAConfig,
    shapes=shapes,
    create=create,
    forward=forward,
    merge=merge,
    frozen=("rank_mask",),
    kinds=(*LINEAR_LIKE, "conv"),
    capabilities=(
        LowRank(low_rank_factors),
        PeftExchange("adalora"),
        Schedule(allocator_state, allocate, guard),
        Regularizer(orthogonality),
        # The MiniLM demo's 50 steps, r = init_r = 8: held-out accuracy 75.8% at lr 2e-3, 83.0% at 5e-3, 81.9% at 1e-2
        Recipe(lr=5e-3, options=(("target_r", 4), ("tinit", 10), ("tfinal", 10), ("deltaT", 5), ("total_step", 50))),
    ),
)
