"""`stack` / `unstack`: K adapters as one pytree with a leading K dimension on every leaf.

A stacked adapter is what `torch.func.vmap` maps over (K adapters in one pass, `vmap(grad(...))` trains
K at once) and what `apply(..., adapter_ids=...)` picks rows from. Whether params are stacked is read
from the leaves themselves: a leaf is stacked when its shape is `(K, *declared)`, `declared` being the
variant's shapes for that target (`_structure.declared_shapes`, which also checks everything else about the
params). Under `vmap` the K dimension is hidden, so the same params look unstacked to the `apply` inside.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._pad import pad_ranks, same_but_rank
from ._params import Params
from ._structure import check
from ._transform import in_transform


def stack(adapters: Sequence[Params], *, pad: bool = False) -> Params:
    """K adapters of one config and one set of targets as one: every leaf gains a leading K dimension.

    `torch.func.vmap` runs the K adapters in one pass (the base layers see K times the rows), and
    `vmap(grad(...))` trains them at once (K seeds, K learning rates, ...):

    >>> stacked = lf.stack([lf.init(model, cfg, seed=s) for s in range(8)])
    >>> logits = torch.func.vmap(lambda p: lf.apply(model, p, batch).logits)(stacked)  # (8, B, T, V)
    >>> out = lf.apply(model, stacked, batch, adapter_ids=torch.tensor([0, 3, -1, 7]))  # one adapter per row

    The same K forward/backward passes also run without vmap over the model: repeat the batch K times
    and give block k of rows adapter k (`adapter_ids=torch.arange(K).repeat_interleave(B)`); the model
    then sees one ordinary batch, which suits models with ops vmap cannot batch (SDPA on CPU).

    Outside torch.func transforms the result holds new leaf tensors (not views of the inputs); a stacked
    leaf requires grad when the inputs' leaves do, so `torch.optim` can train the stack directly. Inside a
    transform, `stack` is an ordinary differentiable `torch.stack`.

    `pad=True` stacks low-rank adapters (LoRA, PiSSA, DoRA, EVA) whose configs differ in `r`, `alpha` or
    their patterns: each is zero-padded to the largest rank, B rescaled to the stack's scale, so each
    computes exactly what it did (lora_func/_pad.py); the stack's config is the first adapter's with that
    rank. Other variants of different ranks are refused by name.

    >>> mixed = lf.stack([lf.init(model, lf.LoRAConfig(r=r, alpha=2 * r), seed=0) for r in (4, 8, 16)], pad=True)
    """
    if isinstance(adapters, Params):
        raise TypeError("stack: `adapters` must be a sequence of Params, got a single Params")
    adapters = list(adapters)
    if not adapters:
        raise ValueError("stack: `adapters` is empty; give at least one Params")
    for i, p in enumerate(adapters):
        if not isinstance(p, Params):
            raise TypeError(f"stack: `adapters[{i}]` must be lora_func Params, got {type(p).__name__}")
    first = adapters[0]
    if (
        pad
        and any(p.config != first.config for p in adapters)
        and all(same_but_rank(p.config, first.config) and p.targets == first.targets for p in adapters)
    ):
        adapters = pad_ranks(adapters, "stack")
        first = adapters[0]
    check(first, "stack", stacked=False, halves=True, name="adapters[0]")  # the others must equal it, below
    for i, p in enumerate(adapters[1:], start=1):
        if p.config != first.config:
            hint = ""
            if same_but_rank(p.config, first.config):
                hint = "; they differ in rank only: lf.stack(adapters, pad=True) zero-pads the low-rank family"
            raise ValueError(
                f"stack: `adapters[{i}]` has config {p.config!r}, `adapters[0]` has {first.config!r}{hint}"
            )
        if p.frozen != first.frozen:
            raise ValueError(f"stack: `adapters[{i}]` has other `lf.freeze` leaves than `adapters[0]`")
        if p.targets != first.targets:
            theirs, ours = {t.path for t in p.targets}, {t.path for t in first.targets}
            diff = sorted(theirs ^ ours)[:3] or "the same paths with other shapes or roles"
            raise ValueError(f"stack: `adapters[{i}]` has other targets than `adapters[0]`: {diff}")
        names = [(path, leaf) for path, leaf, _ in p.leaves()]
        if names != [(path, leaf) for path, leaf, _ in first.leaves()]:
            raise ValueError(f"stack: `adapters[{i}]` has other leaves than `adapters[0]` (mixing split halves?)")
        for path, leaf, tensor in p.leaves():
            ref = first[path][leaf]
            if tensor.shape != ref.shape or tensor.dtype != ref.dtype or tensor.device != ref.device:
                raise ValueError(
                    f"stack: `adapters[{i}]` leaf {path}.{leaf} is {tuple(tensor.shape)} {tensor.dtype} on "
                    f"{tensor.device}; `adapters[0]` has {tuple(ref.shape)} {ref.dtype} on {ref.device}"
                )
    fresh = not in_transform()
    entries = {}
    for path in first:
        entry = {}
        for leaf in first[path]:
            tensors = [p[path][leaf] for p in adapters]
            if fresh:
                stacked = torch.stack([t.detach() for t in tensors]).requires_grad_(
                    any(t.requires_grad for t in tensors)
                )
            else:
                stacked = torch.stack(tensors)
            entry[leaf] = stacked
        entries[path] = entry
    return first.replace(entries)


def unstack(params: Params) -> list[Params]:
    """The K adapters of a stacked `params` (see `stack`), each with its own copy of its leaves.

    >>> for k, p in enumerate(lf.unstack(stacked)): lf.save(p, f"adapter_{k}.safetensors")

    Outside torch.func transforms each leaf is a new tensor (requires grad as the stacked leaf does);
    inside a transform `unstack` is a differentiable `unbind`.
    """
    size = check(params, "unstack", stacked=True, halves=True)
    fresh = not in_transform()
    adapters: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in range(size)]
    for path, entry in params.items():
        for adapter in adapters:
            adapter[path] = {}
        for leaf, tensor in entry.items():
            parts = tensor.detach().unbind(0) if fresh else tensor.unbind(0)
            for adapter, part in zip(adapters, parts):
                adapter[path][leaf] = part.clone().requires_grad_(tensor.requires_grad) if fresh else part
    return [params.replace(entries) for entries in adapters]
