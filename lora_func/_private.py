"""DP-SGD's gradient: each example's gradient clipped, summed, plus Gaussian noise (Abadi et al. 2016).

    private_grads = (Σᵢ clip(gᵢ, C) + N(0, σ²C² I)) / B,    clip(g, C) = g · min(1, C / (‖g‖ + 1e-6))

gᵢ is example i's gradient of its own loss over all trainable leaves, C = `max_grad_norm`, σ =
`noise_multiplier`, B the batch's rows or `expected_batch_size` (Poisson sampling). The clip factor, the
noise call and B are Opacus's (`opacus/optimizers/optimizer.py`: `clip_and_accumulate`, `_generate_noise`,
`scale_grad`), so a DP-SGD step here is an Opacus step, and Opacus's accountants give its ε.

Two ways to the clipped sum, chosen per call:
- book-keeping, for LoRA on linear-like layers (Bu et al. 2023, arXiv 2210.00038): one forward and one
  backward, in which each target's LoRA product (`kinds/linear.py`, `LowRank`) hands over its input x and its
  output gradient g instead of forming dA and dB. Example i's squared gradient norm at a target is
  ‖g_iᵀ h_i‖² + ‖gh_iᵀ x_i‖² (h = s x Aᵀ, gh = s g B, each example's T tokens), computed either as those
  small per-example products (n × r × d values, one target at a time) or with the Gram trick,
  ⟨g_i g_iᵀ, h_i h_iᵀ⟩ (T × T per example; Li et al. 2021, arXiv 2110.05679, Opacus's ghost clipping),
  whichever takes fewer operations (the Gram trick when T (d + r) < d r, i.e. sequences shorter than about
  r). Then the clipped sum is Σᵢ cᵢ g_iᵀ h_i = (c g)ᵀ h per factor: what ghost clipping's second, weighted
  backward computes for these leaves, without running the model's backward twice. Per-example gradients of
  the whole adapter are never held.
- every other variant (and LoRA where the above does not apply: other layer kinds, `modules_to_save`, leaves
  frozen by `lf.freeze`): `per_example_grads`' single pass with one adapter copy per row, then the per-example
  norms and the weighted sum: n × the trainable leaves in memory.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from ._apply import apply
from ._attribution import per_example_grads
from ._params import SHARED, Params, combine, split
from ._structure import check
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
    Poisson sampling (Opacus's `DPDataLoader`, whose batches vary in size). `batch` follows `apply`'s
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
    n = _rows(batch)
    trainable, frozen = split(params)
    names = [(path, leaf) for path, leaf, _ in trainable.leaves()]
    if not names:
        raise ValueError("private_grads: `params` has no trainable leaves (all frozen?)")

    summed = _book_keeping(model, trainable, frozen, batch, loss, n, C) if _book_keeping_applies(params) else None
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


def _rows(batch: Any) -> int:
    tensors = [
        v for v in pytree.tree_leaves(dict(batch) if isinstance(batch, Mapping) else batch) if torch.is_tensor(v)
    ]
    if not tensors or tensors[0].dim() == 0:
        raise ValueError("private_grads: `batch` has no tensor whose dim 0 holds the examples")
    n = tensors[0].shape[0]
    if n == 0:
        raise ValueError("private_grads: `batch` has no rows; DP-SGD needs at least one example per call")
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


def _squared_norms(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """‖uᵢᵀ vᵢ‖²_F for each example i of u (n, T, p), v (n, T, q), p ≥ q: (n,)."""
    tokens, p, q = u.shape[1], u.shape[2], v.shape[2]
    if gram_pays(tokens, p, q):
        return ((u @ u.mT) * (v @ v.mT)).sum((1, 2))  # the Gram trick: T × T per example
    return (v.mT @ u).square().sum((1, 2))  # the q × p per-example product (small side first: BLAS's fast layout)


def _book_keeping(model, trainable, frozen, batch, loss, n, C) -> dict[tuple[str, str], torch.Tensor] | None:
    live = trainable.replace(
        {p: {k: v.detach().requires_grad_(True) for k, v in e.items()} for p, e in trainable.items()}
    )
    owner = {live[path]["A"].data_ptr(): path for path in live}
    records: dict[str, list[tuple[torch.Tensor, ...]]] = {path: [] for path in live}
    unmatched = []

    def record(A, B, x, h, gh, g) -> None:
        path = owner.get(A.data_ptr())
        if path is None or x.shape[0] % n:
            unmatched.append(A)
        else:
            records[path].append((x, h, gh, g))

    leaves = [t for _, _, t in live.leaves()]
    with recording(record):
        losses = _per_row_losses(loss, apply(model, combine(live, frozen), batch), n)
        direct = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
    if unmatched or any(g is not None for g in direct):
        return None  # a product this path cannot see (a cast leaf, a layer not batch-first): the general path

    with torch.no_grad():  # the recorded pieces belong to the forward's graph
        return _clipped_sum(trainable, records, n, C)


def _by_example(calls: list[torch.Tensor], n: int) -> torch.Tensor:
    """Token rows (n·T, d) of each call as (n, T, d), the calls' tokens side by side."""
    parts = [t.reshape(n, -1, t.shape[-1]) for t in calls]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _clipped_sum(trainable, records, n, C) -> dict[tuple[str, str], torch.Tensor]:
    pieces = {}
    squared: torch.Tensor | float = 0.0
    for path, calls in records.items():
        if not calls:
            continue
        # Each example's tokens over every call of the target (a layer called twice adds its gradients).
        x = _by_example([c[0] for c in calls], n)  # (n, T, d_in)
        h = _by_example([c[1] for c in calls], n)  # (n, T, r)
        gh = _by_example([c[2].t() for c in calls], n)  # (n, T, r)
        g = _by_example([c[3] for c in calls], n)  # (n, T, d_out)
        squared = squared + (_squared_norms(x, gh) + _squared_norms(g, h)).float()  # ‖dAᵢ‖² + ‖dBᵢ‖²
        pieces[path] = (x, h, gh, g)
    if not pieces:  # no target ran: every gradient is zero
        return {(path, leaf): torch.zeros_like(t) for path, leaf, t in trainable.leaves()}
    c = _clip_factors(squared, C)

    summed = {}
    for path, leaf, t in trainable.leaves():
        if path not in pieces:
            summed[path, leaf] = torch.zeros_like(t)
            continue
        x, h, gh, g = pieces[path]
        weights = c.to(x.dtype)[:, None, None]
        if leaf == "A":  # Σᵢ cᵢ gh_iᵀ x_i: (r, d_in)
            value = (gh * weights).flatten(0, 1).t() @ x.flatten(0, 1)
        else:  # Σᵢ cᵢ g_iᵀ h_i: (d_out, r)
            value = ((h * weights).flatten(0, 1).t() @ g.flatten(0, 1)).t()
        summed[path, leaf] = value.to(t.dtype)
    return summed
