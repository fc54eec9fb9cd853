"""DP-SGD's gradient: each example's gradient clipped, summed, plus Gaussian noise (Abadi et al. 2016).

    private_grads = (Σᵢ clip(gᵢ, C) + N(0, σ²C² I)) / B,    clip(g, C) = g · min(1, C / (‖g‖ + 1e-6))

gᵢ is example i's gradient of its own loss over all trainable leaves, C = `max_grad_norm`, σ =
`noise_multiplier`, B the batch's rows or `expected_batch_size` (Poisson sampling). The clip factor, the
noise call and B are Opacus's (`opacus/optimizers/optimizer.py`: `clip_and_accumulate`, `_generate_noise`,
`scale_grad`), so a DP-SGD step here is an Opacus step, and Opacus's accountants give its ε.

Two ways to the clipped sum, chosen per call:
- book-keeping, for LoRA on linear-like layers (Bu et al. 2023, arXiv 2210.00038): one forward and one
  backward, in which each target's LoRA product (`kinds/linear.py`, `LowRank`) hands over its input x and
  output gradient g instead of forming the batch's dA and dB. Example i's gradient at a target is
  dAᵢ = ghᵢᵀ xᵢ and dBᵢ = gᵢᵀ hᵢ over its T tokens (h = s x Aᵀ, gh = s g B), and its squared norm is found
  one of two ways, whichever takes fewer operations:
  - the Gram trick of ghost clipping, ‖vᵢᵀ uᵢ‖² = ⟨uᵢ uᵢᵀ, vᵢ vᵢᵀ⟩ (T × T per example; Li et al. 2021,
    arXiv 2110.05679; Opacus's `grad_sample_mode="ghost"`), which never forms the per-example gradient:
    T² (d + r) operations, cheaper when sequences are shorter than about r;
  - otherwise the per-example factor gradient itself, r × d per example and target: T d r operations,
    the same as the backward's own dA, dB, and r/T of the activations it is computed from (which are
    then dropped), so it costs no more memory than the layer's inputs that a backward keeps anyway.
  The clipped sum is then Σᵢ cᵢ dAᵢ (an n-term weighted sum of the kept gradients, or (c gh)ᵀ x from the
  Gram pieces): what ghost clipping's second, weighted backward computes for these leaves, without running
  the model's backward twice. On the bench model (T = 128, r = 8) every factor takes the second way.
- every other variant (and LoRA where the above does not apply: other layer kinds, `modules_to_save`, leaves
  frozen by `lf.freeze`, leaves of another dtype than the activations): `per_example_grads`' single pass
  with one adapter copy per row, then the per-example norms and the weighted sum: n × the trainable leaves.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ._apply import apply
from ._attribution import per_example_grads
from ._params import SHARED, Params, combine, split
from ._structure import check
from ._torch_private import pytree
from ._variant import LINEAR_LIKE
from .kinds.linear import recording
from .variants import lora, variant_for


def private_grads(
    model: nn.Module,
    params: Params,
    batch: Any,
    loss: Callable[[Any], torch.Tensor],
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
    expected_batch_size: int | None = None,
) -> Params:
    """DP-SGD's gradient of the trainable leaves, `(Σᵢ clip(gᵢ, C) + N(0, σ²C²)) / B`, shaped as `lf.split(params)[0]`.

    gᵢ is example i's gradient of its own loss over all trainable leaves together; `clip(g, C) = g · min(1,
    C / (‖g‖ + 1e-6))` with C = `max_grad_norm` (Opacus's factor); the noise has standard deviation
    σ C, σ = `noise_multiplier`, one independent draw per value (`torch.normal`, leaf by leaf in the order of
    `lf.split(params)[0]`, nothing drawn when σ = 0); B is the batch's rows, or `expected_batch_size` under
    Poisson sampling (Opacus's `DPDataLoader`, whose batches vary in size; an empty draw is then allowed, and its
    gradient is the noise alone). `batch` follows `apply`'s
    convention with the examples along dim 0; `loss(output)` returns the per-example losses, shape (B,),
    as for `lf.per_example_grads`. `generator=None` draws from torch's global generator; a seeded
    `torch.Generator` makes the call reproducible bit for bit. Nothing is accumulated on the leaves' `.grad`.

    Privacy accounting is Opacus's: `opacus.accountants.RDPAccountant` (or PRV), `.step(noise_multiplier=σ,
    sample_rate=q)` after each step and `.get_epsilon(delta)`.

    >>> grads = lf.private_grads(model, params, batch, per_row_loss, max_grad_norm=1.0, noise_multiplier=1.1)
    >>> for (_, _, leaf), (_, _, g) in zip(lf.split(params)[0].leaves(), grads.leaves()):
    ...     leaf.grad = g
    >>> optimizer.step()
    """
    C, sigma = _check_arguments(max_grad_norm, noise_multiplier, generator, expected_batch_size, loss)
    check(params, "private_grads", stacked=False)
    n = _rows(batch, poisson=expected_batch_size is not None)
    trainable, frozen = split(params)
    names = [(path, leaf) for path, leaf, _ in trainable.leaves()]
    if not names:
        raise ValueError("private_grads: `params` has no trainable leaves (all frozen?)")

    if n == 0:  # an empty Poisson draw: no example, the noise alone (the model does not run)
        summed = {(path, leaf): torch.zeros_like(t) for path, leaf, t in trainable.leaves()}
    elif _book_keeping_applies(params):
        summed = _book_keeping(model, trainable, frozen, batch, loss, n, C)
    else:
        summed = None
    if summed is None:
        summed = _per_example(model, params, batch, loss, n, C)
    rows = n if expected_batch_size is None else expected_batch_size
    out: dict[str, dict[str, torch.Tensor]] = {path: {} for path in trainable}
    with torch.no_grad():
        for path, leaf in names:
            g = summed[path, leaf]
            if sigma > 0:
                g = g + torch.normal(0.0, sigma * C, size=g.shape, generator=generator, dtype=g.dtype, device=g.device)
            out[path][leaf] = g / rows
    return trainable.replace(out)


# ---- arguments ------------------------------------------------------------------------------------------------


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"private_grads: `{name}` must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"private_grads: `{name}` must be finite, got {value}")
    return value


def _check_arguments(max_grad_norm, noise_multiplier, generator, expected_batch_size, loss) -> tuple[float, float]:
    C = _real(max_grad_norm, "max_grad_norm")
    if C <= 0:
        raise ValueError(f"private_grads: `max_grad_norm` must be > 0 (the clipping bound C), got {C}")
    sigma = _real(noise_multiplier, "noise_multiplier")
    if sigma < 0:
        raise ValueError(f"private_grads: `noise_multiplier` must be >= 0 (σ; 0 adds no noise), got {sigma}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"private_grads: `generator` must be a torch.Generator or None, got {type(generator).__name__}")
    if expected_batch_size is not None:
        if isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, numbers.Integral):
            raise TypeError(
                f"private_grads: `expected_batch_size` must be a positive int or None, got "
                f"{type(expected_batch_size).__name__}"
            )
        if expected_batch_size <= 0:
            raise ValueError(f"private_grads: `expected_batch_size` must be > 0, got {expected_batch_size}")
    if not callable(loss):
        raise TypeError(
            f"private_grads: `loss` must be a callable returning per-example losses, got {type(loss).__name__}"
        )
    return C, sigma


def _rows(batch: Any, poisson: bool) -> int:
    tensors = [
        v for v in pytree.tree_leaves(dict(batch) if isinstance(batch, Mapping) else batch) if torch.is_tensor(v)
    ]
    if not tensors or tensors[0].dim() == 0:
        raise ValueError("private_grads: `batch` has no tensor whose dim 0 holds the examples")
    n = tensors[0].shape[0]
    if n == 0 and not poisson:
        raise ValueError(
            "private_grads: `batch` has no rows; DP-SGD needs at least one example per call (under Poisson sampling, "
            "where a draw may be empty, give `expected_batch_size`: the step is then the noise alone)"
        )
    return n


def _per_row_losses(loss: Callable, output: Any, n: int) -> torch.Tensor:
    losses = loss(output)
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (n,):
        shown = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"private_grads: `loss` must return the {n} per-example losses, shape ({n},); got {shown}")
    return losses


def _clip_factors(squared_norms: torch.Tensor, C: float) -> torch.Tensor:
    """Opacus's per-example factor min(1, C / (‖gᵢ‖ + 1e-6))."""
    return (C / (squared_norms.sqrt() + 1e-6)).clamp(max=1.0)


# ---- every variant: per-example gradients -------------------------------------------------------------------


def _per_example(model, params, batch, loss, n, C) -> dict[tuple[str, str], torch.Tensor]:
    detached = params.replace({p: {k: v.detach() for k, v in e.items()} for p, e in params.items()})
    grads = per_example_grads(model, detached, batch, lambda output: _per_row_losses(loss, output, n))
    flat = [(path, leaf, g) for path, leaf, g in grads.leaves()]
    squared = sum(g.reshape(n, -1).square().sum(1) for _, _, g in flat)
    c = _clip_factors(squared, C)
    return {(path, leaf): torch.einsum("i,i...->...", c.to(g.dtype), g) for path, leaf, g in flat}


# ---- LoRA: book-keeping ---------------------------------------------------------------------------------------


def _book_keeping_applies(params: Params) -> bool:
    """LoRA's product on linear-like layers (`LowRank`) everywhere, and A, B the only trainable leaves."""
    variant = variant_for(params.config, caller="private_grads")
    if variant.forward is not lora.forward or SHARED in params:
        return False
    by_path = {t.path: t for t in params.targets}
    trainable, _ = split(params)
    for path, entry in trainable.items():
        target = by_path.get(path)
        if target is None or target.kind not in LINEAR_LIKE or set(entry) != {"A", "B"}:
            return False
    return set(trainable) == set(by_path)


def gram_pays(tokens: int, d: int, r: int) -> bool:
    """Whether ⟨u uᵀ, v vᵀ⟩ over T tokens (T² (d + r) multiply-adds) is cheaper than forming uᵀ v (T d r)."""
    return tokens * (d + r) < d * r


class _Factor:
    """One factor's per-example gradients at one target, over every call of the layer (a layer called twice adds
    its gradients): either formed, `product` (n, r, d) (each example's gradient, r ≪ T: smaller than the
    activations it comes from), or kept as the pair u (n, T, d), v (n, T, r) whose per-example product vᵢᵀ uᵢ
    the Gram trick never forms (sequences shorter than r)."""

    __slots__ = ("product", "u", "v")

    def __init__(self) -> None:
        self.product: torch.Tensor | None = None
        self.u: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def add(self, u: torch.Tensor, v: torch.Tensor) -> None:
        """u (n, T, d), v (n, T, r): this call's gradient of example i is vᵢᵀ uᵢ (r, d)."""
        if self.u or (self.product is None and gram_pays(u.shape[1], u.shape[2], v.shape[2])):
            self.u.append(u)
            self.v.append(v)
            return
        product = v.mT @ u  # (n, r, d): small side first, BLAS's fast layout
        self.product = product if self.product is None else self.product + product

    def squared_norms(self) -> torch.Tensor:
        if self.product is not None:
            return self.product.square().sum((1, 2))
        u, v = torch.cat(self.u, 1), torch.cat(self.v, 1)  # each example's tokens over every call
        return ((u @ u.mT) * (v @ v.mT)).sum((1, 2))  # the Gram trick: T × T per example

    def clipped_sum(self, c: torch.Tensor) -> torch.Tensor:
        """Σᵢ cᵢ vᵢᵀ uᵢ, (r, d)."""
        if self.product is not None:
            return torch.einsum("n,nrd->rd", c.to(self.product.dtype), self.product)
        u, v = torch.cat(self.u, 1), torch.cat(self.v, 1)
        return (v * c.to(v.dtype)[:, None, None]).flatten(0, 1).t() @ u.flatten(0, 1)


def _book_keeping(model, trainable, frozen, batch, loss, n, C) -> dict[tuple[str, str], torch.Tensor] | None:
    live = trainable.replace(
        {p: {k: v.detach().requires_grad_(True) for k, v in e.items()} for p, e in trainable.items()}
    )
    owner = {live[path]["A"].data_ptr(): path for path in live}
    factors = {path: {"A": _Factor(), "B": _Factor()} for path in live}
    unmatched = []

    def record(A, B, x, h, gh, g) -> None:
        # x (n·T, d_in), h = s x Aᵀ (n·T, r), gh = s Bᵀ gᵀ (r, n·T), g (n·T, d_out); examples are batch-first
        path = owner.get(A.data_ptr())
        if path is None or x.shape[0] % n:
            unmatched.append(A)
            return
        r = h.shape[-1]
        factors[path]["A"].add(x.reshape(n, -1, x.shape[-1]), gh.t().reshape(n, -1, r))  # dAᵢ = ghᵢᵀ xᵢ
        factors[path]["B"].add(g.reshape(n, -1, g.shape[-1]), h.reshape(n, -1, r))  # dBᵢᵀ = hᵢᵀ gᵢ

    leaves = [t for _, _, t in live.leaves()]
    with recording(record):
        losses = _per_row_losses(loss, apply(model, combine(live, frozen), batch), n)
        direct = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
    if unmatched or any(g is not None for g in direct):
        return None  # a product this path cannot see (a cast leaf, a layer not batch-first): the general path

    with torch.no_grad():
        seen = [f for entry in factors.values() for f in entry.values() if f.product is not None or f.u]
        if not seen:  # no target ran: every gradient is zero
            return {(path, leaf): torch.zeros_like(t) for path, leaf, t in trainable.leaves()}
        c = _clip_factors(sum(f.squared_norms().float() for f in seen), C)
        summed = {}
        for path, leaf, t in trainable.leaves():
            factor = factors[path][leaf]
            if factor.product is None and not factor.u:
                summed[path, leaf] = torch.zeros_like(t)
                continue
            value = factor.clipped_sum(c)  # A: (r, d_in); B: its transpose (r, d_out)
            summed[path, leaf] = (value if leaf == "A" else value.t()).to(t.dtype)
    return summed
