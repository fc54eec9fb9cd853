"""All of the injection's mutable state, in one place. Everything else in the package is functions of it.

Process-wide (guarded by `LOCK`):
    HOOKED    {(module, role): [count, handles]}: the dispatchers registered on the model's modules, counted across
              the injections (and threads) that need them; registered at the first, removed at the last
    ENTERED   {graph task id: (keep_graph, [weakref(LayerCall)])}: the checkpointed layer calls each running backward
              has reached, so that their recomputes find their injection (`checkpoint.py`)
    EAGER     [open eager blocks, the compile stance the first found] (`compiled.py`)

Per thread (`per_thread`, a `threading.local`, created by `thread_state()`):
    active     {module: Injection}: what this thread's open blocks inject, per module they touch
    layers     [(layer, injection, first sequence number)]: the checkpointed layers running now
    modes      [(module, detaching mode or None, function-mode depth before it)]: the modules running now that
               own base parameters requiring grad (`detach.py`)
    detaching  how many of those modes are entered
    replacing  [(module, replacing mode or None, depth)]: the parameter-form targets running now (`replace.py`)
"""

from __future__ import annotations

import threading

from torch import nn

LOCK = threading.RLock()  # guards hook registration, reference counts and the records of running backwards


per_thread = threading.local()  # .active: {module: Injection} for this thread; .layers, .modes: stacks


HOOKED: dict[tuple[nn.Module, str], list] = {}  # (module, role) -> [count, handles]


ENTERED: dict[int, tuple[bool, list]] = {}  # graph task -> (keep_graph, weakrefs to the layer calls it reached)


MISSING = object()


EAGER: list = [0, None]  # eager blocks open in the process, and the compile stance they found (see `run_eager`)


def thread_state() -> dict:
    active = getattr(per_thread, "active", None)
    if active is None:
        active = per_thread.active = {}
        per_thread.layers = []  # (layer, injection, first sequence number) of the checkpointed layers running
        per_thread.modes = []  # (module, detaching mode or None, function-mode depth before it) of the modules running
        per_thread.detaching = 0  # how many of those modes are entered
        per_thread.replacing = []  # (module, replacing mode or None, depth) of the parameter-form modules running
    return active
