"""The adapter pytree: `params[path][leaf]` is a tensor; config and targets ride along as static data."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import optree
import torch

from ._config import AdapterConfig
from ._kind import SHARED as SHARED
from ._kind import Target
from ._torch_private import OPTREE_GLOBAL_NAMESPACE, pytree
from .variants import registered


class Params(Mapping):
    """Adapter leaves by module path: `params["model.layers.0.self_attn.q_proj"]["A"]`.

    A pytree node for `torch.utils._pytree` and `optree`, so `torch.func.grad`, `vmap` and
    `optree.tree_map` take it as it is. `config` and `targets` are static (not leaves). `variant` is the
    registered variant of `config` (None for a config class no variant registers), resolved once here; the layout
    (declared leaf shapes) is derived once by the first structure check and rides along with `replace`.
    """

    __slots__ = ("_entries", "config", "targets", "frozen", "variant", "layout")

    def __init__(
        self,
        entries: Mapping[str, Mapping[str, torch.Tensor]],
        config: AdapterConfig,
        targets: tuple[Target, ...],
        frozen: frozenset[tuple[str, str]] = frozenset(),
    ) -> None:
        self._entries = {path: dict(leaves) for path, leaves in entries.items()}
        self.config = config
        self.targets = tuple(targets)
        # (path, leaf) pairs frozen by `lf.freeze`, beyond the variant's own frozen leaves: training state,
        # static like the config, and not saved (a loaded adapter trains all of its variant's leaves).
        self.frozen = frozenset(frozen)
        self.variant = registered(config)
        self.layout = None  # (declared shapes, growing shared dims): set by `lora_func._structure.check`

    def __reduce__(self):
        """Pickled and deep-copied as its constructor's arguments: the variant and layout are found again."""
        return (Params, (self._entries, self.config, self.targets, self.frozen))

    def __getitem__(self, path: str) -> dict[str, torch.Tensor]:
        return self._entries[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def replace(self, entries: Mapping[str, Mapping[str, torch.Tensor]]) -> Params:
        """Same config, targets and frozen leaves (and so the same variant and layout), other leaf tensors."""
        out = Params(entries, self.config, self.targets, self.frozen)
        out.layout = self.layout
        return out

    def leaves(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        """(path, leaf name, tensor) for every leaf."""
        for path, entry in self._entries.items():
            for name, tensor in entry.items():
                yield path, name, tensor

    def num_params(self) -> int:
        return sum(t.numel() for _, _, t in self.leaves())

    def __repr__(self) -> str:
        n_targets = sum(path != SHARED for path in self._entries)
        return f"Params({self.config!r}, {n_targets} targets, {self.num_params():,} values)"


def _flatten(params: Params):
    paths = tuple(params._entries)
    return [params._entries[p] for p in paths], (paths, params.config, params.targets, params.frozen)


def _unflatten(children, context) -> Params:
    paths, config, targets, frozen = context
    return Params(dict(zip(paths, children)), config, targets, frozen)


def _flatten_with_keys(params: Params):
    children, context = _flatten(params)
    return [(pytree.MappingKey(p), c) for p, c in zip(context[0], children)], context


def _flatten_with_entries(params: Params):
    children, context = _flatten(params)
    return children, context, context[0]


pytree.register_pytree_node(
    Params,
    _flatten,
    _unflatten,
    serialized_type_name="lora_func.Params",
    flatten_with_keys_fn=_flatten_with_keys,
)
# The global namespace, so that plain `optree.tree_map(f, params)` sees the node.
optree.register_pytree_node(
    Params,
    _flatten_with_entries,
    lambda context, children: _unflatten(children, context),  # optree passes (metadata, children)
    namespace=OPTREE_GLOBAL_NAMESPACE,
)


def split(params: Params) -> tuple[Params, Params]:
    """`(trainable, frozen)`: the leaves that train, and the frozen rest (PiSSA's A0/B0, DeLoRA's norms, ...,
    and the leaves `lf.freeze` froze).

    >>> trainable, frozen = lf.split(params)
    >>> grads = torch.func.grad(lambda t: lf.apply(model, lf.combine(t, frozen), batch).loss)(trainable)
    """
    from .kinds import frozen_leaves
    from .variants import variant_for

    variant = params.variant or variant_for(params.config, caller="split")
    by_path = {t.path: t for t in params.targets}
    trainable, frozen = {}, {}
    for path, entry in params.items():
        frozen_names = frozen_leaves(variant, path, by_path)
        trainable[path] = {k: v for k, v in entry.items() if not is_frozen(params, frozen_names, path, k)}
        frozen[path] = {k: v for k, v in entry.items() if is_frozen(params, frozen_names, path, k)}
    return params.replace(trainable), params.replace(frozen)


def is_frozen(params: Params, variant_frozen: tuple[str, ...], path: str, leaf: str) -> bool:
    """Whether a leaf is in `split`'s frozen half: frozen by its variant, or by `lf.freeze`."""
    return leaf in variant_frozen or (path, leaf) in params.frozen


def combine(trainable: Params, frozen: Params) -> Params:
    """Inverse of `split`."""
    if not isinstance(trainable, Params) or not isinstance(frozen, Params):
        raise TypeError("combine: `trainable` and `frozen` must be Params from `lf.split`")
    if list(trainable) != list(frozen):
        raise ValueError(
            f"combine: `trainable` and `frozen` cover different paths: {sorted(set(trainable) ^ set(frozen))[:5]}"
        )
    if trainable.config != frozen.config:
        raise ValueError("combine: `trainable` and `frozen` come from different configs")
    if trainable.frozen != frozen.frozen:
        raise ValueError("combine: `trainable` and `frozen` come from params with different `lf.freeze` leaves")
    entries = {}
    for path in trainable:
        overlap = set(trainable[path]) & set(frozen[path])
        if overlap:
            raise ValueError(f"combine: leaves {sorted(overlap)} of {path!r} are in both halves")
        entries[path] = {**trainable[path], **frozen[path]}
    return trainable.replace(entries)


def trainable_leaves(params: Params) -> list[torch.Tensor]:
    """The tensors a `torch.optim` optimizer should update."""
    return [t for entry in split(params)[0].values() for t in entry.values()]
