"""Calibration for data-driven variants: one pass over whole-model batches, keeping Xᵀ X per target (EVA,
AntiPaSTO: `collect_input_stats`) or the mean weight gradient dL/dW (LoRA-GA: `collect_weight_gradients`).

Temporary forward pre-hooks see each target's input X (padding tokens dropped where the batch carries
a 2-D `attention_mask`) and accumulate, in float64, its Gram matrix Xᵀ X, its column sum 1ᵀ X and its
row count, so memory is d_in² per target however much data passes through. Targets that read the
very same tensor in every batch (q/k/v of one attention, gate/up of one MLP) share one accumulator.
The model runs in eval mode (dropout off), bitsandbytes layers excepted (see below); every module's
`training` flag is restored afterwards, and the hooks are removed, even when the model raises.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ._kind import Target
from ._progress import progress as progress_bar
from ._variant import InputStats, WeightGradient
from .kinds.linear import is_linear_like, quantization

_CHUNK_ROWS = 4096  # rows cast to float64 at a time, to bound the transient copy of a long batch


def _token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The layer input as (n, d_in) rows, without the padding positions when the mask lines up."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(device=x.device, dtype=torch.bool)]
    return x.reshape(-1, x.shape[-1])


class _Moments:
    """Running Xᵀ X, 1ᵀ X and n of the rows seen so far (float64), shared by targets with the same history."""

    def __init__(self, gram: torch.Tensor, total: torch.Tensor, count: int) -> None:
        self.gram, self.total, self.count = gram, total, count
        self.owners = 0  # how many targets currently point here

    @classmethod
    def of(cls, rows: torch.Tensor) -> _Moments:
        d = rows.shape[-1]
        gram = torch.zeros(d, d, dtype=torch.float64, device=rows.device)
        total = torch.zeros(d, dtype=torch.float64, device=rows.device)
        for chunk in rows.split(_CHUNK_ROWS):
            chunk = chunk.to(torch.float64)
            gram.addmm_(chunk.T, chunk)
            total += chunk.sum(0)
        return cls(gram, total, rows.shape[0])

    def copy(self) -> _Moments:
        return _Moments(self.gram.clone(), self.total.clone(), self.count)

    def add(self, other: _Moments) -> None:
        self.gram += other.gram
        self.total += other.total
        self.count += other.count


class _Collector:
    """Per batch: one `_Moments` per distinct input tensor; at the batch end, folded into the targets'
    running moments. Targets whose history (accumulator, inputs this batch) is identical keep sharing
    one accumulator, updated in place; a target whose inputs diverge gets its own copy."""

    def __init__(self) -> None:
        self.owner: dict[str, _Moments] = {}
        self.inputs: list[tuple[weakref.ref, _Moments]] = []  # distinct inputs of this batch
        self.seen: dict[str, list[int]] = {}  # target -> indices into `inputs`, this batch

    def record(self, path: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        # q/k/v read the same tensor: one product for all three. A weak reference, so that activations
        # are not kept alive, and compared by identity, so that a recycled id() cannot alias.
        index = next((i for i, (ref, _) in enumerate(self.inputs) if ref() is x), None)
        if index is None:
            self.inputs.append((weakref.ref(x), _Moments.of(_token_rows(x.detach(), mask))))
            index = len(self.inputs) - 1
        self.seen.setdefault(path, []).append(index)

    def end_batch(self) -> None:
        groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
        for path, indices in self.seen.items():
            old = self.owner.get(path)
            groups.setdefault((id(old), tuple(indices)), []).append(path)
        for (_, indices), paths in groups.items():
            old = self.owner.get(paths[0])
            if old is None:
                moments = self.inputs[indices[0]][1].copy()
                indices = indices[1:]
            elif old.owners == len(paths):  # everyone on `old` moves the same way: update in place
                moments = old
            else:
                old.owners -= len(paths)
                moments = old.copy()
            for index in indices:
                moments.add(self.inputs[index][1])
            moments.owners = len(paths)
            for path in paths:
                self.owner[path] = moments
        self.inputs.clear()
        self.seen.clear()

    def stats(self) -> dict[str, InputStats]:
        shared = {id(m): InputStats(m.gram, m.count, m.total, {}) for m in self.owner.values()}
        return {path: shared[id(m)] for path, m in self.owner.items()}


def collect_input_stats(
    model: nn.Module,
    targets: Iterable[Target],
    batches: Iterable[Any],
    *,
    caller: str = "init",
    progress: bool = True,
) -> dict[str, InputStats]:
    """Xᵀ X, 1ᵀ X and the token count of every target's inputs over `batches` (whole-model inputs).

    Targets that never ran are absent from the result.
    """
    from ._sites import call_model

    _checked_batches(batches, caller)
    collector = _Collector()
    mask: list[torch.Tensor | None] = [None]

    def make_hook(path: str):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            collector.record(path, x, mask[0])

        return hook

    modes = {module: module.training for module in model.modules()}
    handles = []
    try:
        for target in targets:
            module = model.get_submodule(target.path)
            handles.append(module.register_forward_pre_hook(make_hook(target.path), with_kwargs=True))
        for module in modes:
            # Eval mode: no dropout noise in the statistics, no BatchNorm running-stat updates. Except
            # bnb layers: a CPU eval-mode Linear4bit forward repacks its weight in place (lossy), which
            # would change the model; their forward is the same in either mode under no_grad.
            if is_linear_like(module) and quantization(module) is not None:
                continue
            module.training = False
        with torch.no_grad():
            for batch in progress_bar(batches, progress, "calibration"):
                attention = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                mask[0] = attention if isinstance(attention, torch.Tensor) and attention.dim() == 2 else None
                call_model(model, batch)
                collector.end_batch()
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    stats = collector.stats()
    if not stats:
        raise ValueError(f"{caller}: `calibration_data` is empty, or no target ran during calibration")
    return stats


def _checked_batches(batches: Any, caller: str) -> None:
    if isinstance(batches, (torch.Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"{caller}: `calibration_data` must be an iterable of batches (e.g. a list or a DataLoader), "
            f"got {type(batches).__name__}"
        )


def _output_loss(model: nn.Module, batch: Any) -> Any:
    """The default calibration loss: the model's own `loss` (a Hugging Face model given `labels`), or its output
    where that is the loss itself."""
    from ._sites import call_model

    out = call_model(model, batch)
    if isinstance(out, torch.Tensor):
        return out
    value = getattr(out, "loss", None)
    if value is None and isinstance(out, Mapping):
        value = out.get("loss")
    return value


class _Tap(torch.autograd.Function):
    """y' = y (a copy) that hands (dL/dy, x) to `sink` in backward. `anchor`, a scalar leaf that requires grad, makes
    y' require grad where nothing upstream does; differentiating with respect to it alone runs every tap whose
    output reaches the loss, and writes no parameter's `.grad`. x is an autograd saved tensor, so it lives with
    the graph and no longer."""

    @staticmethod
    def forward(ctx, y, x, anchor, sink):
        ctx.save_for_backward(x)
        ctx.sink = sink
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        ctx.sink(g, x)
        return g, None, None, None  # the anchor's gradient: zero, as None


def collect_weight_gradients(
    model: nn.Module,
    targets: Iterable[Target],
    batches: Iterable[Any],
    loss: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    *,
    caller: str = "init",
    progress: bool = True,
) -> dict[str, WeightGradient]:
    """dL/dW of every target over `batches`, averaged over its calls (PEFT's LoRA-GA `estimate_gradients`).

    Each batch runs `loss(model, batch)` (default: the output's `loss`, as a Hugging Face model computes it from the
    batch's `labels`) forward and backward once. A forward hook passes each target's output y through `_Tap`, whose
    backward receives dL/dy and the target's input x: the call's weight gradient is (dL/dy)ᵀ x over its token rows
    (y = x Wᵀ + b for the linear-like kinds), summed in float32 over calls and batches, then divided by the number
    of calls whose output reached the loss, as PEFT divides its accumulated `weight.grad` by its backward-hook
    count. `torch.autograd.grad` differentiates with respect to a scalar anchor alone: no parameter's `.grad` is
    written, no `requires_grad` flag is touched, and W is never read, so quantized layers take part. The model runs
    in train mode as PEFT's does (dropout as in training), with HF gradient checkpointing switched off (reentrant
    checkpointing does not allow `torch.autograd.grad`); every module's `training` and `gradient_checkpointing`
    flag is restored afterwards and the hooks removed, even when the model or the loss raises.
    Targets that never ran are absent from the result.
    """
    _checked_batches(batches, caller)
    if loss is not None and not callable(loss):
        raise TypeError(f"{caller}: `calibration_loss` must be a function (model, batch) -> loss, got {loss!r}")
    run = loss if loss is not None else _output_loss
    sums: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    counts: dict[str, int] = {}
    ran: set[str] = set()
    mask: list[torch.Tensor | None] = [None]
    anchor = torch.zeros((), requires_grad=True)

    def make_sink(path: str, rows_mask: torch.Tensor | None):
        def sink(g: torch.Tensor, x: torch.Tensor) -> None:
            x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
            g2 = g.reshape(-1, g.shape[-1]).to(torch.float32)
            contribution = (x2.T @ g2).T  # as autograd's linear backward computes dL/dW: (xᵀ g)ᵀ
            if path in sums:
                sums[path] += contribution
            else:
                sums[path] = contribution.contiguous()
            calls[path] = calls.get(path, 0) + 1
            counts[path] = counts.get(path, 0) + _token_rows(x, rows_mask).shape[0]

        return sink

    def make_hook(path: str):
        def hook(module, args, kwargs, output):
            if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            ran.add(path)
            return _Tap.apply(output, x.detach(), anchor, make_sink(path, mask[0]))

        return hook

    modes = {module: module.training for module in model.modules()}
    checkpointed = [m for m in model.modules() if m.__dict__.get("gradient_checkpointing") is True]
    handles = []
    try:
        for target in targets:
            module = model.get_submodule(target.path)
            handles.append(module.register_forward_hook(make_hook(target.path), with_kwargs=True))
        for module in modes:
            module.training = True
        for module in checkpointed:
            module.gradient_checkpointing = False
        with torch.enable_grad():
            for index, batch in enumerate(progress_bar(batches, progress, "calibration")):
                attention = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                mask[0] = attention if isinstance(attention, torch.Tensor) and attention.dim() == 2 else None
                value = run(model, batch)
                if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
                    raise ValueError(
                        f"{caller}: calibration batch {index} gave no scalar loss (got {type(value).__name__}): give "
                        "batches with `labels` for a model that computes its loss, or `calibration_loss`"
                    )
                if value.requires_grad:
                    torch.autograd.grad(value, anchor, allow_unused=True)
                del value
    finally:
        for handle in handles:
            handle.remove()
        for module in checkpointed:
            module.gradient_checkpointing = True
        for module, training in modes.items():
            module.training = training
    if not ran:
        raise ValueError(f"{caller}: `calibration_data` is empty, or no target ran during calibration")
    unreached = sorted(ran - set(sums))
    if unreached:
        raise ValueError(
            f"{caller}: the calibration loss does not depend on the output of {unreached[:3]}"
            f"{' ...' if len(unreached) > 3 else ''}: there is no gradient to initialise them from"
        )
    return {path: WeightGradient(total / calls[path], calls[path], counts[path]) for path, total in sums.items()}
