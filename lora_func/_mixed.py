"""Mixed-adapter batches: row i of the batch runs adapter `adapter_ids[i]` of a stacked adapter; -1 = base.

`apply` reads the ids once per call and groups the rows by adapter (`AdapterRows`); each target's hook
then runs the variant's own forward (or input transform) on each group with that group's adapter, and
puts the rows back in order. Rows with id -1 keep the base layer's output (or input) as it is: exactly
the base model, and no gradient to any adapter. Works for every variant: each group is an ordinary
single-adapter call on fewer rows.

In inference (eval mode, grad off), a variant may batch the rows itself (`Variant.inference`; LoRA on linear
layers: each row's A and B gathered, two batched matmuls, base rows multiplied by zero), which costs a few ops
per target whatever the adapters: what serving K adapters in one `generate` batch needs. Otherwise,
two ways to run the groups, chosen once per call:
- vmapped (at least two adapters, and padding every group to the largest at most doubles the adapted
  rows): the groups' rows are gathered into a (groups, width, ...) block, padded by repeating a row,
  and `torch.func.vmap` runs the variant once over the groups, each with its own adapter's leaves.
  One call per target whatever the number of adapters. When the rows already come grouped, in equal
  numbers and without -1 rows (e.g. `adapter_ids = arange(K)`), the block is a view: no copies.
- looped (one adapter, or very unequal groups): one variant call per group on that group's rows.

Cost per target and call, B rows, G distinct adapters in the batch:
- compute: each row's per-token adapter work as in a single-adapter call (plus padded rows, at most as
  many again, when vmapped); a variant's per-call work (DoRA's weight norm, HRA's reflections, ...)
  once per distinct adapter, G times.
- memory: leaves are never copied per row. Vmapped, the G adapters' leaves of the target are gathered
  once (no copy when the batch uses adapters 0..K-1 in order): at most the stack's own size, however
  large B is, and kept for backward when training. The layer's input and output are copied into group
  order (activation-sized) unless they are grouped already.
Gathering each row's leaves instead (and vmapping over rows) would cost B x the adapter's size, kept
for backward, and repeat the per-call work B times (for DoRA, B products of size r x d_in x d_out).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch

from ._variant import Leaves, Site


def _id_list(adapter_ids: torch.Tensor | Sequence[int], caller: str) -> list[int]:
    if isinstance(adapter_ids, torch.Tensor):
        if adapter_ids.dtype == torch.bool or adapter_ids.is_floating_point() or adapter_ids.is_complex():
            raise TypeError(f"{caller}: `adapter_ids` must hold integers, got a {adapter_ids.dtype} tensor")
        if adapter_ids.dim() != 1:
            raise ValueError(
                f"{caller}: `adapter_ids` must be 1-D (one id per batch row), got shape {tuple(adapter_ids.shape)}"
            )
        return adapter_ids.tolist()
    if isinstance(adapter_ids, (str, bytes)) or not isinstance(adapter_ids, Sequence):
        raise TypeError(f"{caller}: `adapter_ids` must be a 1-D integer tensor or a sequence of ints")
    ids = []
    for row, a in enumerate(adapter_ids):
        try:
            ids.append(operator.index(a))  # ints, numpy integers; not floats
        except TypeError:
            raise TypeError(f"{caller}: `adapter_ids` must hold ints, got {a!r} at row {row}") from None
        if isinstance(a, bool):
            raise TypeError(f"{caller}: `adapter_ids` must hold ints, got {a!r} at row {row}")
    return ids


class AdapterRows:
    """The rows of one batch grouped by adapter, for every target of one call (see the module docstring)."""

    def __init__(self, adapter_ids: torch.Tensor | Sequence[int], count: int, caller: str) -> None:
        ids = _id_list(adapter_ids, caller)
        if not ids:
            raise ValueError(f"{caller}: `adapter_ids` is empty; give one id per batch row")
        for row, a in enumerate(ids):
            if not -1 <= a < count:
                raise ValueError(
                    f"{caller}: `adapter_ids` has {a} at row {row}; `params` stacks {count} adapters "
                    f"(ids 0..{count - 1}, or -1 for the base model)"
                )
        self.caller = caller
        self.ids = tuple(ids)
        self._index: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.direct = list(ids) == list(range(len(ids)))  # row i uses adapter i
        self.rows = len(ids)
        groups: dict[int, list[int]] = {}  # adapter -> its rows, adapters in order of first appearance
        for row, a in enumerate(ids):
            groups.setdefault(a, []).append(row)
        adapted = {a: rows for a, rows in groups.items() if a >= 0}
        width = max((len(rows) for rows in adapted.values()), default=0)
        self.vmapped = len(adapted) >= 2 and width * len(adapted) <= 2 * sum(map(len, adapted.values()))
        if self.vmapped:
            self._plan_vmapped(adapted, width, count)
        else:
            self._plan_looped(ids, groups)

    def _plan_vmapped(self, adapted: dict[int, list[int]], width: int, count: int) -> None:
        # Block row g * width + i is row i of group g (padded with the group's first row).
        self.width = width
        gather = [rows[min(i, len(rows) - 1)] for rows in adapted.values() for i in range(width)]
        position = {row: g * width + i for g, rows in enumerate(adapted.values()) for i, row in enumerate(rows)}
        identity = gather == list(range(self.rows))  # grouped already, equal sizes, no base rows
        self.gather = None if identity else torch.tensor(gather)
        # Output row r comes from block row position[r], or for a base row from the base output (after the block).
        self.take = None if identity else torch.tensor([position.get(r, len(gather) + r) for r in range(self.rows)])
        self.has_base_rows = len(position) < self.rows
        used = list(adapted)
        self.leaf_index = None if used == list(range(count)) else torch.tensor(used)

    def _plan_looped(self, ids: list[int], groups: dict[int, list[int]]) -> None:
        runs: list[list[int]] = []  # [adapter, length] of each run of equal ids
        for a in ids:
            if runs and runs[-1][0] == a:
                runs[-1][1] += 1
            else:
                runs.append([a, 1])
        self.order: torch.Tensor | None = None
        self.inverse: torch.Tensor | None = None
        if len(runs) == len(groups):  # each adapter's rows are contiguous: slices, no copies
            self.adapters = [a for a, _ in runs]
            self.sizes = [n for _, n in runs]
            return
        self.adapters = list(groups)
        self.sizes = [len(rows) for rows in groups.values()]
        self.order = torch.tensor([row for rows in groups.values() for row in rows])
        self.inverse = torch.empty_like(self.order)
        self.inverse[self.order] = torch.arange(len(ids))

    def check(self, x: torch.Tensor, site: Site) -> None:
        if x.dim() == 0 or x.shape[0] != self.rows:
            rows = x.shape[0] if x.dim() else "no"
            raise ValueError(
                f"{self.caller}: `adapter_ids` has {self.rows} entries, but {site.target.path!r} got an input "
                f"with {rows} rows on dim 0; give one id per batch row (mixed batches need layers that keep "
                "the batch on dim 0)"
            )

    def per_row(self, stacked: torch.Tensor) -> torch.Tensor:
        """Row i's adapter of a stacked leaf, (rows, ...), zero for a base row (-1): for variants that gather one
        adapter per row (`Variant.inference`). The stack itself when row i uses adapter i, every one of them."""
        if self.direct and stacked.shape[0] == self.rows:
            return stacked
        index, keep = self._index.get(stacked.device, (None, None))
        if index is None:
            ids = torch.tensor(self.ids, device=stacked.device)
            index, keep = ids.clamp(min=0), None if bool((ids >= 0).all()) else (ids >= 0)
            self._index[stacked.device] = index, keep
        rows = stacked.index_select(0, index)
        if keep is not None:
            rows = rows * keep.view(-1, *(1,) * (rows.dim() - 1)).to(rows.dtype)
        return rows

    # -- vmapped -------------------------------------------------------------------------------------
    def _block(self, t: torch.Tensor) -> torch.Tensor:
        """(groups, width, ...) rows of `t`, group g using adapter `used[g]`."""
        if self.gather is not None:
            t = t.index_select(0, self.gather.to(t.device))
        return t.unflatten(0, (-1, self.width))

    def _unblock(self, block: torch.Tensor, unchanged: torch.Tensor) -> torch.Tensor:
        """Rows back in batch order; base rows from `unchanged`."""
        out = block.flatten(0, 1)
        if self.take is None:
            return out
        if self.has_base_rows:
            out = torch.cat([out, unchanged])
        return out.index_select(0, self.take.to(out.device))

    def _used_leaves(self, leaves: Leaves) -> Leaves:
        if self.leaf_index is None:
            return leaves
        return {name: t.index_select(0, self.leaf_index.to(t.device)) for name, t in leaves.items()}

    # -- looped --------------------------------------------------------------------------------------
    def _grouped(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.order is not None:
            t = t.index_select(0, self.order.to(t.device))
        return t.split(self.sizes)

    def _restored(self, parts: list[torch.Tensor]) -> torch.Tensor:
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        if self.inverse is not None:
            out = out.index_select(0, self.inverse.to(out.device))
        return out

    # -- the two forms of a variant ------------------------------------------------------------------
    def forward(
        self,
        forward: Callable,
        x: torch.Tensor,
        y: torch.Tensor,
        leaves: Leaves,
        site: Site,
    ) -> torch.Tensor:
        """The variant's output-form `forward`, each row with its own adapter."""
        self.check(x, site)
        if self.vmapped:
            each = torch.func.vmap(
                lambda x_g, y_g, leaves_g: forward(x_g, y_g, leaves_g, site), randomness=_random(site)
            )
            return self._unblock(each(self._block(x), self._block(y), self._used_leaves(leaves)), y)
        parts = [
            y_g if a < 0 else forward(x_g, y_g, pick(leaves, a), site)
            for a, x_g, y_g in zip(self.adapters, self._grouped(x), self._grouped(y))
        ]
        return self._restored(parts)

    def forward_input(self, transform: Callable, x: torch.Tensor, leaves: Leaves, site: Site) -> torch.Tensor:
        """The variant's input transform, each row with its own adapter; the base layer then runs once."""
        self.check(x, site)
        if self.vmapped:
            each = torch.func.vmap(lambda x_g, leaves_g: transform(x_g, leaves_g, site), randomness=_random(site))
            return self._unblock(each(self._block(x), self._used_leaves(leaves)), x)
        parts = [
            x_g if a < 0 else transform(x_g, pick(leaves, a), site) for a, x_g in zip(self.adapters, self._grouped(x))
        ]
        return self._restored(parts)


def _random(site: Site) -> str:
    """vmap's randomness: with adapter dropout active, each adapter (group) draws its own mask."""
    return "different" if getattr(site.config, "dropout", 0.0) and site.base.training else "error"


def pick(leaves: Leaves, adapter: int) -> Leaves:
    """One adapter's leaves out of stacked ones (views)."""
    return {name: tensor[adapter] for name, tensor in leaves.items()}
