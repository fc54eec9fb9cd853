"""Compiled models meet an adapter: the outputs and gradients of eager, for two different adapters in turn, never
the base model or another layer's adapter in silence.

- a model compiled before an eager `lf.inject` block (`torch.compile(model)`, or in place, `model.compile()`):
  its compiled code ignores hooks added after it compiled (dynamo does not guard on them); while an eager block
  is open, compiled code runs eagerly;
- the model compiled inside the block: the same;
- `torch.compile(lf.AdapterModule(model, params))` with the base as HF loads it (`requires_grad=True`): trains
  through `lf.apply`'s compiled path;
- after the block, compiled code compiles again.

Backend "eager" (dynamo alone) keeps this fast; test_compile.py covers the compiled `lf.apply` step itself.
"""

from __future__ import annotations

import pytest
import torch
from conftest import changes, perturbed, qwen3_batch, snapshot, tiny_qwen3
from torch._dynamo.utils import counters

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


def assert_same(got, expected):
    torch.testing.assert_close(got[0], expected[0])
    for g, e in zip(got[1], expected[1]):
        torch.testing.assert_close(g, e)


COMPILES = {
    "before": lambda model: torch.compile(model, backend="eager"),
    "in-place": lambda model: model.compile(backend="eager") or model,
}


@pytest.mark.parametrize("how", list(COMPILES))
@pytest.mark.parametrize("cfg", [lf.LoRAConfig(r=4), lf.IA3FFConfig()], ids=["lora", "ia3ff"])
def test_model_compiled_before_the_block_runs_the_adapter(cfg, how):
    model = tiny_qwen3(num_hidden_layers=2)  # requires_grad=True everywhere, as from_pretrained leaves it
    batch = qwen3_batch()
    pairs = adapters(model, cfg)
    expected = [loss_and_grads(lambda p=p: lf.apply(model, p, batch).loss, p) for p in pairs]
    before = snapshot(model)
    compiled = COMPILES[how](model)
    with torch.no_grad():
        base = compiled(**batch).loss  # compiled here, before any block
    for params, reference in zip(pairs, expected):
        with lf.inject(model, params):
            got = loss_and_grads(lambda c=compiled: c(**batch).loss, params)
        assert_same(got, reference)
        assert not torch.equal(got[0], base)
    graphs = counters["stats"]["unique_graphs"]
    other = qwen3_batch(seq=7)
    with torch.no_grad():  # after the block: compiled code again (a new shape compiles), the base model
        torch.testing.assert_close(compiled(**batch).loss, base)
        torch.testing.assert_close(compiled(**other).loss, model(**other).loss)
    assert counters["stats"]["unique_graphs"] > graphs
    # torch.compile itself leaves attributes on the modules it traced; lora_func leaves nothing else.
    assert [c for c in changes(model, before) if c != "model attrs"] == []


def test_model_compiled_inside_the_block_runs_each_layers_adapter():
    model = tiny_qwen3(num_hidden_layers=2)
    batch = qwen3_batch()
    for params in adapters(model):
        expected = loss_and_grads(lambda p=params: lf.apply(model, p, batch).loss, params)
        with lf.inject(model, params):
            compiled = torch.compile(model, backend="eager")
            got = loss_and_grads(lambda c=compiled: c(**batch).loss, params)
        assert_same(got, expected)


def test_compiled_adapter_module_trains_like_eager():
    model = tiny_qwen3(num_hidden_layers=2)
    batch = qwen3_batch()
    before = snapshot(model)
    for params in adapters(model):
        module = lf.AdapterModule(model, params)
        expected = loss_and_grads(lambda m=module: m(**batch).loss, module.params)
        compiled = torch.compile(module, backend="eager")
        got = loss_and_grads(lambda c=compiled: c(**batch).loss, module.params)
        assert_same(got, expected)
    assert [c for c in changes(model, before) if c != "model attrs"] == []
