"""torch.compile of a training step that calls `lf.apply`: one graph, no recompiles when the adapter's
values change, the same loss and gradients as eager for different adapters in turn, the model untouched.

The backend is "aot_eager" (dynamo + AOT autograd, no code generation) to keep the suite fast on CPU;
the benchmark measures inductor. `fullgraph=True` makes any graph break an error, which
`torch._dynamo.explain` alone does not: a frame it has to skip can still report zero breaks.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_untouched, perturbed, qwen3_batch, snapshot, tiny_qwen3

import lora_func as lf


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def hook_dicts(model):
    names = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
    return {(path, name): getattr(m, name) for path, m in model.named_modules() for name in names}


# DeLoRA has a frozen leaf too (`combine` inside the compiled step); LoRA's eager forward is a custom
# autograd.Function that dynamo cannot trace, so the compiled path must take the plain one.
@pytest.mark.slow  # dynamo traces the whole model: 5-11 s on one core
@pytest.mark.parametrize("cfg", [lf.DeLoRAConfig(r=4), lf.LoRAConfig(r=4, alpha=8)], ids=["delora", "lora"])
def test_compiled_training_step_matches_eager_without_breaks_or_recompiles(dynamo, cfg):
    model = tiny_qwen3(num_hidden_layers=1)
    batch = qwen3_batch()
    adapters = [perturbed(lf.init(model, cfg, seed=s), seed=10 + s) for s in range(2)]
    frozen = lf.split(adapters[0])[1]

    def loss_fn(trainable, batch):
        return lf.apply(model, lf.combine(trainable, frozen), batch).loss

    explained = torch._dynamo.explain(loss_fn)(lf.split(adapters[0])[0], batch)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()

    before = snapshot(model)
    dicts = hook_dicts(model)
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    # Two different adapters in turn, then the first again: a stale-weights bug would show here.
    # Another model's eager output awaiting its backward in between changes lf.apply's global bookkeeping
    # of pending injections; the compiled step must not be guarded on it (a recompile would raise here).
    other = tiny_qwen3(num_hidden_layers=1)
    awaiting = lf.apply(other, lf.init(other, cfg, seed=5), batch).loss
    for params in (adapters[0], adapters[1], adapters[0]):
        if params is adapters[1]:
            awaiting.backward()  # the other model's injection closes
        trainable = lf.split(params)[0]
        leaves = [t for _, _, t in trainable.leaves()]
        loss = compiled(trainable, batch)
        grads = torch.autograd.grad(loss, leaves)
        eager_loss = loss_fn(trainable, batch)
        eager_grads = torch.autograd.grad(eager_loss, leaves)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(loss_fn(lf.split(adapters[1])[0], batch), eager_loss)  # the adapters differ

    # Untouched, down to the identity and type of each hook dict (a compiled restore could swap them).
    assert_untouched(model, before)
    assert all(getattr(m, n) is d for (p, n), d in dicts.items() for m in [model.get_submodule(p)])
    handle = model.model.layers[0].mlp.up_proj.register_forward_hook(lambda *a: None, prepend=True)
    handle.remove()
    assert_untouched(model, before)


@pytest.mark.slow  # dynamo traces the whole model: 5-11 s on one core
def test_compiled_optimizer_loop_equals_eager(dynamo):
    """A plain AdamW loop with a compiled loss: the same trajectory as eager, one compilation."""
    model = tiny_qwen3(num_hidden_layers=1)
    batch = qwen3_batch()
    cfg = lf.LoRAConfig(r=4)
    compiled = torch.compile(lambda p, b: lf.apply(model, p, b).loss, backend="aot_eager", fullgraph=True)
    trajectories = []
    for loss_fn in (compiled, lambda p, b: lf.apply(model, p, b).loss):
        params = lf.init(model, cfg, seed=0)
        opt = torch.optim.AdamW(lf.trainable_leaves(params), lr=1e-2)
        losses = []
        for _ in range(4):
            loss = loss_fn(params, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        trajectories.append(losses)
    torch.testing.assert_close(trajectories[0], trajectories[1], rtol=1e-5, atol=1e-6)
    assert trajectories[0][-1] < trajectories[0][0]
