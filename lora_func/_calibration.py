"""Calibration for data-driven variants: one pass over whole-model batches, keeping Xᵀ X per target.

Temporary forward pre-hooks see each target's input X (padding tokens dropped where the batch carries
a 2-D `attention_mask`) and accumulate, in float64, its Gram matrix Xᵀ X, its column sum 1ᵀ X and its
row count, so memory is d_in² per target however much data passes through. Targets that read the
very same tensor in every batch (q/k/v of one attention, gate/up of one MLP) share one accumulator.
The model runs in eval mode (dropout off), bitsandbytes layers excepted (see below); every module's
`training` flag is restored afterwards, and the hooks are removed, even when the model raises.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ._base import quantization
from ._progress import progress as progress_bar
from ._targets import Target, is_linear_like
from ._variant import InputStats

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

    if isinstance(batches, (torch.Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"{caller}: `calibration_data` must be an iterable of batches (e.g. a list or a DataLoader), "
            f"got {type(batches).__name__}"
        )
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
