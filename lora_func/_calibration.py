"""Calibration for data-driven variants: one pass over whole-model batches, keeping Xᵀ X per target.

Temporary forward pre-hooks accumulate the Gram matrix of each target's inputs (padding tokens
dropped where the batch carries a 2-D `attention_mask`), so memory is d_in² per target however
much data passes through. The hooks are removed even when the model raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ._targets import Target
from ._variant import InputStats


def _progress(iterable: Iterable, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, leave=False)


def _token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The layer input as (n, d_in) rows, without the padding positions when the mask lines up."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(torch.bool)]
    return x.reshape(-1, x.shape[-1])


def collect_input_stats(
    model: nn.Module,
    targets: Iterable[Target],
    batches: Iterable[Any],
    *,
    caller: str = "init",
    progress: bool = True,
) -> dict[str, InputStats]:
    """Xᵀ X and the token count of every target's inputs over `batches` (whole-model inputs)."""
    from ._apply import call_model

    if isinstance(batches, (torch.Tensor, Mapping)):
        raise TypeError(f"{caller}: `calibration_data` must be an iterable of batches, not a single batch")
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask: list[torch.Tensor | None] = [None]
    per_input: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}  # id(x) -> (x, gram, n), one batch

    def make_hook(path: str):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if id(x) not in per_input:  # q/k/v read the same tensor: one product for all three
                rows = _token_rows(x.detach(), mask[0]).to(torch.float64)
                per_input[id(x)] = (x, rows.T @ rows, rows.shape[0])
            _, gram, n = per_input[id(x)]
            grams[path] = grams[path] + gram if path in grams else gram.clone()
            counts[path] = counts.get(path, 0) + n

        return hook

    handles = [
        model.get_submodule(t.path).register_forward_pre_hook(make_hook(t.path), with_kwargs=True) for t in targets
    ]
    try:
        with torch.no_grad():
            for batch in _progress(batches, progress, "calibration"):
                attention = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                mask[0] = attention if isinstance(attention, torch.Tensor) and attention.dim() == 2 else None
                call_model(model, batch)
                per_input.clear()
    finally:
        for handle in handles:
            handle.remove()
        per_input.clear()
    if not grams:
        raise ValueError(f"{caller}: `calibration_data` is empty, or no target ran during calibration")
    return {path: InputStats(grams[path], counts[path]) for path in grams}
