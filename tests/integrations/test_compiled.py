"""Compiled models meet an adapter: correct outputs and gradients (equal to eager, for two different adapters in
turn), or a clear refusal naming the problem, never the base model or another layer's adapter in silence.

- the model compiled inside an eager `lf.inject` block: the compiled code hands lora_func's dispatchers back to
  eager Python (they refuse to be traced), so every layer runs its own adapter;
- `torch.compile(lf.AdapterModule(model, params))` with the base as HF loads it (`requires_grad=True`): trains
  through `lf.apply`'s compiled path;
- a model compiled in place (`model.compile()`), whose compiled code ignores hooks added later: refused by name.

Backend "eager" (dynamo alone) keeps this fast; test_compile.py covers the compiled `lf.apply` step itself.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_untouched, changes, perturbed, qwen3_batch, snapshot, tiny_qwen3

import lora_func as lf


@pytest.fixture(autouse=True)
def dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def adapters(model, cfg=None):
    cfg = cfg or lf.LoRAConfig(r=4)
    return [perturbed(lf.init(model, cfg, seed=s), seed=10 + s) for s in range(2)]


def loss_and_grads(run, params):
    leaves = lf.trainable_leaves(params)
    loss = run()
    return loss.detach(), torch.autograd.grad(loss, leaves)


# dynamo's own tracing of the resumed frames reads `.grad` of a non-leaf and warns about it.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("cfg", [lf.LoRAConfig(r=4), lf.IA3FFConfig()], ids=["lora", "ia3ff"])
def test_model_compiled_inside_a_block_runs_each_layers_adapter(cfg):
    # A frozen base: with base parameters that require grad, dynamo traces lora_func's detaching function mode
    # and fails inside the model's code (not silent; still open).
    model = tiny_qwen3(num_hidden_layers=2).requires_grad_(False)
    batch = qwen3_batch()
    before = snapshot(model)
    for params in adapters(model, cfg):
        expected = loss_and_grads(lambda p=params: lf.apply(model, p, batch).loss, params)
        with lf.inject(model, params):
            compiled = torch.compile(model, backend="eager")
            got = loss_and_grads(lambda c=compiled: c(**batch).loss, params)
        torch.testing.assert_close(got[0], expected[0])
        for g, e in zip(got[1], expected[1]):
            torch.testing.assert_close(g, e)
    with torch.no_grad():
        assert not torch.equal(expected[0], model(**batch).loss)  # not the base
    # torch.compile itself leaves attributes on the modules it traced; lora_func leaves nothing else.
    assert [c for c in changes(model, before) if c != "model attrs"] == []


def test_compiled_adapter_module_trains_like_eager():
    model = tiny_qwen3(num_hidden_layers=2)  # requires_grad=True everywhere, as from_pretrained leaves it
    batch = qwen3_batch()
    before = snapshot(model)
    for params in adapters(model):
        module = lf.AdapterModule(model, params)
        expected = loss_and_grads(lambda m=module: m(**batch).loss, module.params)
        compiled = torch.compile(module, backend="eager")
        got = loss_and_grads(lambda c=compiled: c(**batch).loss, module.params)
        torch.testing.assert_close(got[0], expected[0])
        for g, e in zip(got[1], expected[1]):
            torch.testing.assert_close(g, e)
    assert_untouched(model, before)


def test_model_compiled_in_place_is_refused_by_name():
    model = tiny_qwen3(num_hidden_layers=1).eval()
    batch = qwen3_batch()
    params = adapters(model)[0]
    model.compile(backend="eager")
    with torch.no_grad():
        model(**batch)
    with pytest.raises(RuntimeError, match=r"compiled in place \(module.compile\(\)\)"):
        with lf.inject(model, params):
            pass
    with pytest.raises(RuntimeError, match=r"compiled in place"):
        lf.apply(model, params, batch)
