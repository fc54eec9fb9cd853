"""Probes of every private torch and optree name lora_func uses (`lora_func/_torch_private.py`): each checks that
the name still exists and still does what lora_func relies on, and fails with a message naming the API, so that
a torch release that changes one is found by name instead of by a wrong gradient somewhere else."""

from __future__ import annotations

import gc
import sys
import weakref

import optree
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

import lora_func as lf
from lora_func import _torch_private as private


def in_backward(probe):
    """Run `probe()` inside a backward node and return what it returned."""
    seen = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen["value"] = probe()
            return grad

    x = torch.ones(2, requires_grad=True)
    Probe.apply(x).sum().backward(retain_graph=True)
    return seen["value"]


def probe_graph_task_id():
    assert private.graph_task_id() == -1, "torch._C._current_graph_task_id: not -1 outside a backward"
    assert in_backward(private.graph_task_id) != -1, "torch._C._current_graph_task_id: -1 inside a backward"


def probe_sequence_nr():
    before = private.sequence_nr()
    y = torch.ones(2, requires_grad=True) * 2
    after = private.sequence_nr()
    assert after > before, "torch._C._autograd._get_sequence_nr: does not advance when a node is created"
    assert before <= private.node_sequence_nr(y.grad_fn) < after, "Node._sequence_nr: outside the range it was made in"


def probe_keep_graph():
    assert in_backward(private.graph_task_keep_graph) is True, (
        "torch._C._autograd._get_current_graph_task_keep_graph: False under retain_graph=True"
    )


def probe_current_autograd_node():
    assert private.current_autograd_node() is None, "torch._C._current_autograd_node: a node outside a backward"
    node = in_backward(private.current_autograd_node)
    assert node is not None and isinstance(private.node_sequence_nr(node), int), (
        "torch._C._current_autograd_node: no node inside a backward"
    )


def probe_queue_engine_callback():
    ran = []
    in_backward(lambda: private.queue_engine_callback(lambda: ran.append(private.graph_task_id())))
    assert len(ran) == 1 and ran[0] != -1, "Variable._execution_engine.queue_callback: did not run at backward's end"


def probe_drop_stale_engine_tasks():
    x = torch.ones(3, requires_grad=True)
    shared = x * 2
    held = weakref.ref(shared)
    first, second = shared.sin(), shared.cos()  # `second`'s node runs first; `first`'s is queued when it raises

    def fail(grad):
        raise ZeroDivisionError

    second.register_hook(fail)
    loss = (first + second).sum()
    del shared, first, second
    try:
        loss.backward()
    except ZeroDivisionError:
        pass
    del loss
    gc.collect()
    assert held() is not None, (
        "autograd engine: a failed backward no longer leaves its queued nodes on the thread "
        "(private.drop_stale_engine_tasks may go)"
    )
    with torch.no_grad():
        private.drop_stale_engine_tasks()
    assert held() is None, "Variable._execution_engine.run_backward: a failed backward's queued nodes are still held"


def probe_function_modes():
    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    depth = private.function_mode_depth()
    with Mode() as mode:
        assert private.function_mode_depth() == depth + 1, "torch._C._len_torch_function_stack: not the mode count"
        assert private.function_mode_at(depth) is mode, "torch._C._get_function_stack_at: not the mode entered"
    assert private.function_mode_depth() == depth


def probe_saved_tensors_hooks():
    assert private.saved_tensors_hooks() is None, "torch._C._autograd._top_saved_tensors_default_hooks: not None"
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        hooks = private.saved_tensors_hooks()
        assert hooks is not None and not private.is_checkpoint_hooks(hooks), (
            "torch._C._autograd._top_saved_tensors_default_hooks: the hooks entered are not returned"
        )
    found = []
    x = torch.ones(2, requires_grad=True)
    checkpoint(
        lambda t: found.append(private.is_checkpoint_hooks(private.saved_tensors_hooks())) or t.sin(),
        x,
        use_reentrant=False,
    )
    assert found == [True], "torch.utils.checkpoint._checkpoint_hook: non-reentrant checkpoint's hooks not recognised"


def probe_checkpoint_frames():
    found = []

    def fn(t):
        frame, seen = sys._getframe(), False
        while frame is not None:
            seen = seen or frame.f_code in private.CHECKPOINT_CODES
            frame = frame.f_back
        found.append(seen)
        return t.sin()

    x = torch.ones(2, requires_grad=True)
    checkpoint(fn, x, use_reentrant=True)
    checkpoint(fn, x, use_reentrant=False)
    assert found == [True, True], "torch.utils.checkpoint.CheckpointFunction.forward / checkpoint: frames not found"


def probe_functorch_active():
    assert not private.functorch_active(), "torch._C._functorch.peek_interpreter_stack: active outside torch.func"
    seen = []
    torch.func.vmap(lambda t: seen.append(private.functorch_active()) or t)(torch.ones(2, 3))
    assert seen == [True], "torch._C._functorch.peek_interpreter_stack: inactive inside vmap"


def probe_unwrapped():
    t, seen = torch.ones(3, requires_grad=True), []
    torch.func.grad(lambda u: seen.append(private.unwrapped(u)) or u.sum())(t)
    assert seen[0] is t, "torch._C._functorch.get_unwrapped: grad's wrapper does not unwrap to the caller's tensor"
    assert private.unwrapped(t) is t


def probe_hook_dicts():
    """A hook put into a module's dicts by key, as lora_func does, runs like a registered one; `always_call` runs
    after an exception."""
    calls = []
    module = nn.Linear(2, 2)
    for names, always in (
        (private.FORWARD_PRE_HOOK_DICTS, False),
        ((*private.FORWARD_HOOK_DICTS, private.ALWAYS_CALLED), True),
    ):
        key = private.new_hook_id()
        dicts = [module.__dict__[n] for n in names]
        for flag in dicts[1:]:
            flag[key] = True
        dicts[0][key] = lambda m, args, *rest, always=always: calls.append(("post" if always else "pre", len(rest)))
    assert private.new_hook_id() != private.new_hook_id(), "RemovableHandle.next_id: ids repeat"
    module(torch.ones(1, 2))
    assert calls == [("pre", 1), ("post", 2)], f"nn.Module hook dicts {names}: with-kwargs hooks not called as such"
    calls.clear()
    module.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(ValueError("x")))
    with pytest.raises(ValueError):
        module(torch.ones(1, 2))
    assert ("post", 2) in calls, "nn.Module._forward_hooks_always_called: not run after an exception"


def probe_pytree():
    params = lf.init(nn.Sequential(nn.Linear(4, 4)), lf.LoRAConfig(r=2, exclude_names=()), seed=0)
    leaves = private.pytree.tree_leaves(params)
    assert len(leaves) == 2 and all(isinstance(t, torch.Tensor) for t in leaves), (
        "torch.utils._pytree.register_pytree_node / tree_leaves: Params is not a node"
    )
    assert len(optree.tree_leaves(params)) == 2, (
        f"optree.registry.__GLOBAL_NAMESPACE ({private.OPTREE_GLOBAL_NAMESPACE!r}): Params not seen by plain optree"
    )


def probe_compile_stance():
    import torch._dynamo  # noqa: F401 - compile_stance reads dynamo's state once it is imported
    from torch._dynamo.utils import counters

    current = private.compile_stance()
    assert current is not None and current.stance == "default", "torch._dynamo.eval_frame._stance: not found"
    assert private.set_compile_stance(private.eager_stance(current)), "torch._dynamo.eval_frame._set_stance: refused"
    try:
        assert private.compile_stance().stance == "force_eager", "torch._dynamo.eval_frame._set_stance: not set"
        graphs = counters["stats"]["unique_graphs"]
        torch.compile(lambda x: x.sin() + 1, backend="eager")(torch.ones(3))
        assert counters["stats"]["unique_graphs"] == graphs, "DynamoStance('force_eager'): compiled code still compiles"
    finally:
        assert private.set_compile_stance(current), "torch._dynamo.eval_frame._set_stance: refused"
    assert private.compile_stance() is current


PROBES = {name[len("probe_") :]: fn for name, fn in list(globals().items()) if name.startswith("probe_")}


@pytest.mark.parametrize("name", sorted(PROBES))
def test_private_api(name):
    PROBES[name]()


def test_no_private_names_outside_the_module():
    """The rest of the package reaches private names only through `_torch_private`."""
    import pathlib
    import re

    root = pathlib.Path(lf.__file__).parent
    pattern = re.compile(
        r"torch\._C\b|torch\._[a-z]|torch\.utils\._pytree|__GLOBAL_NAMESPACE|_execution_engine|next_id\b|"
        r"_forward_(pre_)?hooks|_hooks_always_called"
    )
    found = [
        f"{path.relative_to(root)}:{i}"
        for path in root.rglob("*.py")
        if path.name != "_torch_private.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith("#") and "`torch.utils._pytree`" not in line
    ]
    assert not found, f"private torch names outside lora_func/_torch_private.py: {found}"
