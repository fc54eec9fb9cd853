"""Positions: a variant that edits some token positions only (`Positions` in its capabilities: ReFT) reads each
model call's attention mask. A pre-hook on the model's root hands the call's arguments to the injection's
`CallMasks` (`lora_func/_positions.py`), which the targets' forwards read; the post-hook (`always_call`) closes it."""

from __future__ import annotations

from .. import _torch_private as private
from .._params import Params
from .._positions import CallMasks
from .._variant import Positions
from .dispatch import injection_of


def call_masks(variant, params: Params, model, caller: str) -> CallMasks | None:
    """The injection's record of its model calls, for a variant that declares `Positions`; else None."""
    positions = variant.capability(Positions)
    if positions is None:
        return None
    return CallMasks(model, positions.counts(params.config), caller)


def positions_pre_hook(module, args, *rest):
    injection = injection_of(module, private.graph_task_id())
    if injection is not None and injection.positions is not None:
        injection.positions.enter(args, rest[0] if rest else {})


def positions_hook(module, args, *rest):
    injection = injection_of(module, private.graph_task_id())
    if injection is not None and injection.positions is not None:
        injection.positions.exit()
