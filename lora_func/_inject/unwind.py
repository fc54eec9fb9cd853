"""What an exception leaves on the thread.

The modes above are pushed by a pre-hook and popped by an `always_call` forward hook, which torch runs for an
`Exception` but not for a `BaseException` (KeyboardInterrupt, SystemExit, GeneratorExit). Two boundaries
catch what such an exception leaves: the block's `__exit__` unwinds what was pushed since its `__enter__`;
and in a backward, where the autograd engine itself drops the modes a failing node entered, the next push
(or the next block) drops the entries whose mode is no longer on the thread's stack.
"""

from __future__ import annotations

from .. import _torch_private as private
from .checkpoint import drop_failed_tasks
from .state import per_thread


def _stale(entry: tuple) -> bool:
    _, mode, depth = entry
    if mode is None:
        return private.function_mode_depth() < depth
    return private.function_mode_depth() <= depth or private.function_mode_at(depth) is not mode


def heal(stack: list) -> None:
    """Drop the entries on top of `stack` (`per_thread.modes` or `.replacing`) whose mode torch has dropped."""
    while stack and _stale(stack[-1]):
        _, mode, _ = stack.pop()
        if mode is not None and stack is per_thread.modes:
            per_thread.detaching -= 1


def unwind(depths: tuple[int, int, int]) -> None:
    """Exit the modes this thread pushed since `depths` (of modes, replacing, layers) and drop their entries."""
    modes, replacing, layers = per_thread.modes, per_thread.replacing, per_thread.layers
    left = [(entry, modes) for entry in modes[depths[0] :]] + [(entry, replacing) for entry in replacing[depths[1] :]]
    del modes[depths[0] :], replacing[depths[1] :], layers[depths[2] :]
    for (_, mode, depth), stack in sorted(left, key=lambda item: item[0][2], reverse=True):
        if mode is None:
            continue
        if stack is modes:
            per_thread.detaching -= 1
        top = private.function_mode_depth() - 1
        if top == depth and private.function_mode_at(top) is mode:
            mode.__exit__(None, None, None)


def reset_thread() -> None:
    """No injection is open in this thread: whatever its stacks hold was left by an exception (a plain call of a
    model with dispatchers pushes entries without a mode; those are dropped too, harmlessly)."""
    unwind((0, 0, 0))
    per_thread.detaching = 0
    drop_failed_tasks()
