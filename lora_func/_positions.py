"""Which token positions an intervention edits (ReFT): the first f and last l non-padding tokens of each row.

    n_b = Σ_t mask[b, t]                   the row's real tokens (the model call's `attention_mask`; all, without one)
    f_b = min(f, n_b // 2),  l_b = min(l, n_b // 2)          pyreft's cap: a short row gives each end half of it
    edit[b, t] = mask[b, t] and (c[b, t] <= f_b or c[b, t] > n_b − l_b),   c = cumsum(mask): t's rank among them

so left and right padding select the same tokens. One intervention serves both ends (pyreft's `share_weights=True`).
A training call with `labels` counts the row's prompt only: its real tokens whose label is -100 (a row with none, plain
language modelling, counts all its real tokens). pyreft does the same, counting positions over the prompt
(`last_position = len(prompt)`), so that training edits the positions `generate` edits: the prompt's.
The variant's forward runs on the whole block output, and `torch.where(edit, Φ(h), h)` keeps every other position
as the block computed it, with no gradient to the adapter from them: the same values and gradients as pyreft's
gather-intervene-scatter, and each row of a mixed batch (`adapter_ids`) or a vmapped stack keeps its own positions.

A call that continues from a KV cache (its hidden states are shorter than its attention mask: a decoding step of
`generate`) edits nothing: the prompt's positions are edited once, in the call that runs the prompt, and generated
tokens never (pyreft's `intervene_on_prompt=True`).

Where the mask comes from: a pre-hook on the model's root (`lora_func/_inject.py`, role "positions") hands each call
of the model to its injection's `CallMasks`, which the block's forward reads. transformers 5 checkpoints a block's
`forward` inside its module hooks, so under HF gradient checkpointing the edit itself is not recomputed; a checkpoint
around the whole model call recomputes the root's call too, in the same backward, and finds its mask again.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import _torch_private as private

_SPEC = re.compile(r"^(?:f(\d+))?(?:\+?l(\d+))?$")


def parse_positions(spec: str) -> tuple[int, int]:
    """pyreft's `positions` string: "f3+l3" -> (3, 3), "f5" -> (5, 0), "l1" -> (0, 1). A ValueError says why not."""
    match = _SPEC.match(spec) if isinstance(spec, str) else None
    if not spec or match is None or (match.group(1) is None and match.group(2) is None):
        raise ValueError(f'must be "f<first>+l<last>", "f<first>" or "l<last>" (e.g. "f3+l3"), got {spec!r}')
    first, last = int(match.group(1) or 0), int(match.group(2) or 0)
    if first + last == 0:
        raise ValueError(f"selects no position: {spec!r}")
    return first, last


def edit_mask(
    mask: torch.Tensor | None,
    rows: int,
    length: int,
    first: int,
    last: int,
    device,
    labels: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The (rows, length) bool mask of the positions to edit (see the module docstring), or None when the call
    continues from a cache (its `length` is shorter than the mask's). With `labels` (rows, length), the positions
    are counted over each row's prompt: its real tokens labelled -100, or all of them where none is."""
    if mask is None:
        mask = torch.ones(rows, length, dtype=torch.bool, device=device)
    else:
        if mask.dim() != 2 or mask.shape[0] != rows or mask.shape[1] < length:
            raise ValueError(
                f"ReFT: the model's `attention_mask` has shape {tuple(mask.shape)}, but a block's output has {rows} "
                f"rows of {length} positions; the positions need a 2-D (batch, sequence) padding mask"
            )
        if mask.shape[1] > length:
            return None  # a decoding step: past tokens are in the cache
        mask = mask.to(device=device, dtype=torch.bool)
    if labels is not None and tuple(labels.shape) == (rows, length):
        prompt = mask & (labels.to(device) == -100)
        mask = torch.where(prompt.any(1, keepdim=True), prompt, mask)
    rank = mask.long().cumsum(1)  # (rows, length): 1-based rank of each real token
    n = rank[:, -1:]  # (rows, 1)
    f = n.div(2, rounding_mode="floor").clamp(max=first)
    lst = n.div(2, rounding_mode="floor").clamp(max=last)
    return mask & ((rank <= f) | (rank > n - lst))


class _Call:
    __slots__ = ("labels", "mask", "past", "task")

    def __init__(self, mask: torch.Tensor | None, labels: torch.Tensor | None, past: bool, task: int) -> None:
        self.mask, self.labels, self.past, self.task = mask, labels, past, task


class CallMasks:
    """One injection's record of the model call it runs: its attention mask, for the blocks' forwards."""

    def __init__(self, model: nn.Module, counts: tuple[int, int], caller: str) -> None:
        self.first, self.last = counts
        self.caller = caller
        self.current: _Call | None = None
        self._at = _positional_indices(model, ("attention_mask", "labels"))

    def enter(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """A call of the model begins (its root pre-hook)."""
        mask, labels = (_argument(name, at, args, kwargs) for name, at in self._at.items())
        self.current = _Call(mask, labels, _has_past(kwargs), private.graph_task_id())

    def exit(self) -> None:
        self.current = None

    def _call(self) -> _Call:
        current = self.current
        if current is not None and current.task == private.graph_task_id():
            return current
        raise RuntimeError(
            f"{self.caller}: a ReFT block ran outside a call of the model given to {self.caller} (the block was called "
            "on its own, recomputed by a checkpoint inside the model, or run under torch.compile, where the model "
            "call's attention mask is not recorded); ReFT edits positions of the model's rows: call the model"
        )

    def forward(self, fn: Callable, x: torch.Tensor, y: Any, leaves: dict, site: Any) -> Any:
        """The variant's forward `fn` at the chosen positions of the block's output `y`; elsewhere `y` as it is."""
        h = y[0] if isinstance(y, (tuple, list)) else y
        call = self._call()
        edit = None
        if not (call.mask is None and call.past):
            edit = edit_mask(call.mask, h.shape[0], h.shape[1], self.first, self.last, h.device, call.labels)
        if edit is None:
            return y
        out = torch.where(edit.unsqueeze(-1), fn(x, h, leaves, site), h)
        if isinstance(y, (tuple, list)):
            return type(y)((out, *y[1:]))
        return out


def _has_past(kwargs: dict[str, Any]) -> bool:
    """Whether a call without an attention mask continues from a KV cache."""
    cache = kwargs.get("past_key_values")
    if cache is None:
        return False
    length = getattr(cache, "get_seq_length", None)
    return bool(length() > 0) if callable(length) else True


def _positional_indices(model: nn.Module, names: tuple[str, ...]) -> dict[str, int | None]:
    """Where each of `names` sits among the positional arguments of the model's forward (HF: `attention_mask`
    second), or None."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    return {name: params.index(name) if name in params else None for name in names}


def _argument(name: str, at: int | None, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """A tensor argument of the model's call, by keyword or by position; None where absent or not a tensor."""
    value = kwargs.get(name)
    if value is None and at is not None and len(args) > at:
        value = args[at]
    return value if isinstance(value, torch.Tensor) else None
