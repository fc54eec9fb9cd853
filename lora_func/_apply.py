"""`apply`: run a model with an adapter injected for one call (`lf.inject` around that call)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._inject.block import Injection
from ._inject.detach import is_plain_parameter
from ._params import Params
from ._sites import call_args, call_model  # noqa: F401 - call_model: tests reach it here


def apply(
    model: nn.Module,
    params: Params,
    batch: Any,
    *,
    adapter_ids: torch.Tensor | Sequence[int] | None = None,
) -> Any:
    """Run `model` on `batch` with the adapter `params` injected; the model is left as it was.

    `batch`: a Mapping is called as `model(**batch)`, a tuple/list as `model(*batch)`, anything else as
    `model(batch)`. Returns what the model returns (HF: `.loss` when the batch has labels). This is
    `with lf.inject(model, params): model(**batch)`: the same mechanism, thread-safe, and the output can be
    differentiated however the code around it likes (dropped before backward, summed with other losses,
    `retain_graph=True`, `torch.autograd.grad`), with or without HF gradient checkpointing.

    >>> loss = lf.apply(model, params, batch).loss
    >>> loss.backward()  # gradients land on the trainable leaves only

    Only the adapter trains: base parameters get no gradient, even those that require grad (as a freshly
    loaded HF model's all do); their `requires_grad` flags are left as they are. A base parameter that requires
    grad and is not in the config's `modules_to_save` still gets no gradient: name a module there to train a
    copy of it.

    Stacked params (`lf.stack`, K adapters) run either under `torch.func.vmap`, all K on the whole batch,
    or with `adapter_ids`: one id per batch row (1-D integer tensor or ints), row i using adapter
    `adapter_ids[i]` and -1 the base model. Inference and training both work, for every variant; each
    adapter's gradient comes from its own rows only. Cost: see `lora_func/_mixed.py`.

    >>> out = lf.apply(model, lf.stack([p0, p1, p2]), batch, adapter_ids=torch.tensor([2, 0, -1, 2]))
    """
    return apply_call(model, params, *call_args(batch), adapter_ids=adapter_ids)


def apply_call(
    model: nn.Module, params: Params, args: tuple, kwargs: dict[str, Any], *, adapter_ids: Any = None
) -> Any:
    """`apply` of `model(*args, **kwargs)`."""
    injection = Injection(model, params, adapter_ids, "apply")
    overrides = None
    if torch.compiler.is_compiling() and injection.needs_detach and torch.is_grad_enabled():
        # Under compile nothing else runs in between, and dynamo traces the swap: no base gradients.
        overrides = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad and is_plain_parameter(p)}
    with injection:
        if overrides:
            return torch.func.functional_call(model, overrides, args, kwargs)
        return model(*args, **kwargs)
