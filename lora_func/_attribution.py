"""Per-example adapter gradients, and their dot products for data attribution (TracIn-style).

`per_example_grads` runs the batch once with N copies of the adapter, row i using copy i (`apply`'s
`adapter_ids`), and differentiates the sum of the per-example losses: copy i's gradient is example i's.
Unlike `torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))` over the examples, the model runs on
the real batch, so models that branch on their inputs work: HF's attention-mask code checks
`attention_mask.all()`, which vmap cannot batch. `grad_dots` scores pairs of examples by the dot product
of their gradients over all trainable leaves (Pruthi et al. 2020, arXiv 2002.08484).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ._apply import apply
from ._params import Params, combine, split
from ._structure import check
from ._torch_private import pytree


def per_example_grads(model: nn.Module, params: Params, batch: Any, loss: Callable[[Any], torch.Tensor]) -> Params:
    """Each example's gradient of its own loss w.r.t. the trainable leaves: a leaf of shape s comes back as (N, *s).

    `batch` follows `apply`'s convention, with the N examples along dim 0 of its first tensor;
    `loss(output)` returns the N per-example losses, shape (N,) (a `reduction="none"` loss, reduced
    within each example). Examples must not interact inside the model (true of transformers; not of
    batch norm in training mode). The result is a stacked trainable half (see `lf.split`): N x the
    trainable leaves in memory; split large sets into several batches.

    >>> def token_loss(out):  # causal LM: mean next-token loss of each example
    ...     logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    ...     return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)
    >>> train = lf.per_example_grads(model, params, batch, token_loss)
    >>> scores = lf.grad_dots(query, train)  # (n_query, n_train): which examples pushed each query
    """
    check(params, "per_example_grads", stacked=False)
    tensors = [
        v for v in pytree.tree_leaves(dict(batch) if isinstance(batch, Mapping) else batch) if torch.is_tensor(v)
    ]
    if not tensors or tensors[0].dim() == 0:
        raise ValueError("per_example_grads: `batch` has no tensor whose dim 0 holds the examples")
    n = tensors[0].shape[0]
    trainable, frozen = split(params)
    # N copies as expanded views: no memory for the copies; each copy's gradient is its own.
    copies = trainable.replace({p: {k: v.expand(n, *v.shape) for k, v in e.items()} for p, e in trainable.items()})
    frozen = frozen.replace({p: {k: v.expand(n, *v.shape) for k, v in e.items()} for p, e in frozen.items()})
    rows = torch.arange(n)

    def total(copies: Params) -> torch.Tensor:
        losses = loss(apply(model, combine(copies, frozen), batch, adapter_ids=rows))
        if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (n,):
            shown = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"per_example_grads: `loss` must return the {n} per-example losses, shape ({n},); got {shown}"
            )
        return losses.sum()

    return torch.func.grad(total)(copies)


def grad_dots(query: Params, train: Params, *, normalize: bool = False) -> torch.Tensor:
    """`scores[i, j] = ⟨g_query_i, g_train_j⟩`, summed over every leaf: a (n_query, n_train) matrix.

    `query` and `train` are stacked gradients from `per_example_grads` of the same adapter. With
    `normalize=True` the scores are cosine similarities. One checkpoint's TracIn score; sum over
    checkpoints (times the learning rate) for the full estimate.
    """
    for name, grads in (("query", query), ("train", train)):
        if not isinstance(grads, Params):
            raise TypeError(f"grad_dots: `{name}` must be lora_func Params, got {type(grads).__name__}")
    names = [(p, leaf) for p, leaf, _ in query.leaves()]
    if names != [(p, leaf) for p, leaf, _ in train.leaves()]:
        raise ValueError("grad_dots: `query` and `train` have different leaves (gradients of different adapters?)")
    if not names:
        raise ValueError("grad_dots: `query` has no leaves")
    scores = None
    query_sq = train_sq = None
    for path, leaf in names:
        q, t = query[path][leaf], train[path][leaf]
        if q.dim() < 1 or t.dim() < 1 or q.shape[1:] != t.shape[1:]:
            raise ValueError(
                f"grad_dots: leaf {path}.{leaf} is {tuple(q.shape)} in `query` and {tuple(t.shape)} in `train`; "
                "both need a leading example dimension over the same leaf shape (see per_example_grads)"
            )
        q, t = q.flatten(1), t.flatten(1)
        product = q @ t.T
        scores = product if scores is None else scores + product
        if normalize:
            qs, ts = q.square().sum(1), t.square().sum(1)
            query_sq = qs if query_sq is None else query_sq + qs
            train_sq = ts if train_sq is None else train_sq + ts
    if normalize:
        scores = scores / (query_sq.sqrt()[:, None] * train_sq.sqrt()[None, :]).clamp_min(1e-30)
    return scores
