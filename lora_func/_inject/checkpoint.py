"""HF gradient checkpointing: records of checkpointed layer calls that live with the autograd graph.

Backward re-runs each checkpointed layer after the block (or `apply`) has returned. Each injected call of a
checkpointed layer is recorded (`LayerCall`: the injection and the autograd sequence numbers its nodes got) and
held by a pre-hook on the layer output's autograd node, so the record lives exactly as long as that part of the
graph. When a backward reaches the layer, the record is entered for that graph task; the recompute, which runs
inside one of the layer's own nodes, finds its record by that node's sequence number. That is exact whatever else
the same backward runs: outputs of other adapters, of the base model, of other threads. The dispatchers stay
registered (inert for everyone else) until the block has exited and every record has been consumed by a backward
that did not retain the graph, or freed with the graph. A backward that fails leaves the nodes the autograd engine
had queued on the thread holding their part of the graph (and its records) until the thread's next backward; its
end-of-task callback, dropped unrun, runs such a backward at once (`TaskEnd`).
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import TYPE_CHECKING

import torch

from .. import _torch_private as private
from .state import ENTERED, LOCK, per_thread

if TYPE_CHECKING:
    from .block import Injection


def layer_pre_hook(module, args, *rest):
    """A checkpointed layer, in an injected forward that will checkpoint: note where its autograd nodes
    start, and give reentrant checkpointing an input that requires grad (docs/internals.md)."""
    active = getattr(per_thread, "active", None)
    injection = active.get(module) if active else None
    if injection is None or private.graph_task_id() != -1 or not module.gradient_checkpointing:
        return None
    if not (module.training and torch.is_grad_enabled()):
        return None
    per_thread.layers.append((module, injection, private.sequence_nr()))
    if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return None
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            new_args = (*args[:i], a.detach().requires_grad_(), *args[i + 1 :])
            return (new_args, rest[0]) if rest else new_args
    return None


def layer_hook(module, args, *rest):
    layers = getattr(per_thread, "layers", None)
    if not layers or layers[-1][0] is not module:
        return None
    _, injection, start = layers.pop()
    output = rest[-1]
    leaves = private.pytree.tree_leaves(output)
    nodes = {t.grad_fn for t in leaves if isinstance(t, torch.Tensor) and t.grad_fn is not None}
    if nodes:
        call = LayerCall(injection, start, private.sequence_nr())
        for node in nodes:
            node.register_prehook(partial(entered, call))
        injection.pending.append(weakref.ref(call))
    return None


class Lease:
    """Keeps an injection's dispatchers registered; released once (by a backward, or with the graph)."""

    __slots__ = ("injection",)

    def __init__(self, injection: Injection) -> None:
        self.injection = injection
        with LOCK:
            injection.leases += 1

    def release(self) -> None:
        with LOCK:
            injection, self.injection = self.injection, None
            if injection is not None:
                injection.leases -= 1
                injection.unregister_if_done()


class LayerCall:
    """One injected call of a checkpointed layer: its autograd nodes have sequence numbers in [start, stop)."""

    __slots__ = ("injection", "start", "stop", "lease", "__weakref__")

    def __init__(self, injection: Injection, start: int, stop: int) -> None:
        self.injection, self.start, self.stop = injection, start, stop
        self.lease = Lease(injection)
        weakref.finalize(self, self.lease.release)


def entered(call: LayerCall, grad_outputs):
    """A backward reached the layer's output: its recompute belongs to `call` (see `recompute_call`).

    The graph task's list holds weak references: if that backward fails before its end-of-task callback
    runs, the records still die with their graph (and release their leases)."""
    task = private.graph_task_id()
    with LOCK:
        entry = ENTERED.get(task)
        if entry is None:
            drop_failed_tasks()
            entry = ENTERED[task] = (private.graph_task_keep_graph(), [])
            end = TaskEnd(task)
            weakref.finalize(end, _task_dropped, task).atexit = False
            private.queue_engine_callback(end)
        if not any(r() is call for r in entry[1]):
            entry[1].append(weakref.ref(call))
    return None


def drop_failed_tasks() -> None:
    """Forget the backwards that ended in an error (no end-of-task callback) and whose records are gone."""
    with LOCK:
        for stale in [t for t, (_, refs) in ENTERED.items() if all(r() is None for r in refs)]:
            del ENTERED[stale]


class TaskEnd:
    """The end-of-task callback of a backward that reached injected layer calls: the engine runs it when that
    backward completes, and drops it unrun when the backward fails."""

    __slots__ = ("task", "__weakref__")

    def __init__(self, task: int) -> None:
        self.task = task

    def __call__(self) -> None:
        _task_done(self.task)


def _task_dropped(task: int) -> None:
    """The engine dropped a backward's end-of-task callback. If it did not run, that backward failed: the nodes it
    had queued on this thread still hold their part of the graph, and with it layer records (and so the dispatchers),
    after the loss is gone, until the thread's next backward. Drop them now, unless another backward runs on this
    thread (a reentrant one's caller), which pops them first itself (docs/internals.md)."""
    with LOCK:
        failed = ENTERED.pop(task, None) is not None
    if failed and private.graph_task_id() == -1:
        private.drop_stale_engine_tasks()


def _task_done(task: int) -> None:
    with LOCK:
        keep, refs = ENTERED.pop(task, (True, []))
    if not keep:  # the graph's buffers are freed: no later backward recomputes these layers
        for ref in refs:
            call = ref()
            if call is not None:
                call.lease.release()


def recompute_call(task: int) -> LayerCall | None:
    """In backward: the injected layer call whose node is running (None: not a recompute of an injected call)."""
    entry = ENTERED.get(task)
    if entry is None:
        return None
    node = private.current_autograd_node()
    if node is None:
        return None
    seq = private.node_sequence_nr(node)
    found = None
    for ref in entry[1]:
        call = ref()
        if call is not None and call.start <= seq < call.stop:
            if found is not None and not found.injection.same_adapter(call.injection):
                raise RuntimeError(
                    f"{call.injection.caller}: a backward recomputes a checkpointed layer that two injected calls "
                    "from different threads could own (their autograd sequence numbers overlap); call backward on "
                    "each thread's outputs separately"
                )
            found = call
    return found
