"""`freeze`: leave part of an adapter out of training, for both training styles at once.

A leaf is frozen when `split` puts it in its frozen half: its variant declares it frozen (PiSSA's A0/B0,
DoRA's weight norms, ...), or `freeze` named it. Everything that trains reads that one split:
`trainable_leaves` (the torch.optim style), `split(params)[0]` (the torch.func style), `AdapterModule`'s
parameters and `all_reduce_grads`. `requires_grad_(False)` on a leaf does not freeze it: the leaf would stay
in the trainable half, and `torch.func.grad` would still differentiate it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ._params import Params, is_frozen
from .variants import variant_for


def _patterns(value: str | Sequence[str] | None, field: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = (value,) if isinstance(value, str) else tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"freeze: `{field}` must hold strings, got {item!r}")
    if not items:
        raise ValueError(f"freeze: `{field}` is empty; give at least one name, or None")
    return items


def freeze(
    params: Params,
    *,
    targets: str | Sequence[str] | None = None,
    leaves: str | Sequence[str] | None = None,
) -> Params:
    """`params` with the selected leaves frozen: `lf.split` puts them in its frozen half, so they do not train.

    `targets`: regexes matched against each module path (`re.search`, any must match), as the configs'
    `target_names`; None selects every target. `leaves`: leaf names (`"A"`, `"magnitude"`, ...); None selects
    every leaf. A leaf is frozen when both select it; give at least one of them.

    The frozen leaves come back detached (the same storage, `requires_grad=False`); the other leaves are the
    same tensor objects. Build the optimizer (or the `AdapterModule`) from the result. The frozen set is
    training state, like `requires_grad`: `lf.save` writes the values, and `lf.load` returns an adapter whose
    leaves train as its variant says.

    >>> params = lf.freeze(params, leaves="A")  # LoRA-FA: A stays at its random init, B trains
    >>> params = lf.freeze(params, targets=[r"\\.layers\\.[0-3]\\."])  # the first four blocks stay as they are
    >>> optimizer = torch.optim.AdamW(lf.trainable_leaves(params), lr=1e-4)
    """
    if not isinstance(params, Params):
        raise TypeError(f"freeze: `params` must be lora_func Params, got {type(params).__name__}")
    target_patterns = _patterns(targets, "targets")
    leaf_names = _patterns(leaves, "leaves")
    if target_patterns is None and leaf_names is None:
        raise ValueError("freeze: give `targets` (module path regexes), `leaves` (leaf names), or both")
    for pattern in target_patterns or ():
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"freeze: `targets` pattern {pattern!r} is not a regex: {e}") from None
    known = {leaf for _, leaf, _ in params.leaves()}
    for name in leaf_names or ():
        if name not in known:
            raise ValueError(f"freeze: `leaves` names {name!r}; the adapter's leaves are {sorted(known)}")

    variant_frozen = variant_for(params.config, caller="freeze").frozen
    paths = [p for p in params if target_patterns is None or any(re.search(pt, p) for pt in target_patterns)]
    if not paths:
        raise ValueError(f"freeze: `targets` {list(target_patterns)} match no module path of the adapter")
    chosen = {(p, leaf) for p in paths for leaf in params[p] if leaf_names is None or leaf in leaf_names}
    newly = {(p, leaf) for p, leaf in chosen if not is_frozen(params, variant_frozen, p, leaf)}
    if not newly:
        raise ValueError(f"freeze: the selection ({len(chosen)} leaves) holds no trainable leaf; all are frozen")
    entries = {
        path: {leaf: t.detach() if (path, leaf) in newly else t for leaf, t in entry.items()}
        for path, entry in params.items()
    }
    return Params(entries, params.config, params.targets, params.frozen | newly)
