"""Invariant 11: an adapter acts only inside its own call (or block) and its backward, whatever other threads do
with the same model at the same time — with real threads, many iterations, forced interleavings and a
thread switch interval of 10 µs. The model's parameters are never replaced, not even for a moment."""

from __future__ import annotations

import sys
import threading

import pytest
import torch
from conftest import assert_untouched, perturbed, qwen3_batch, snapshot, tiny_qwen3
from torch import nn

import lora_func as lf

ITERATIONS = 25


@pytest.fixture(autouse=True)
def fast_switching():
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


def make(model, name: str = "lora", seed: int = 0) -> lf.Params:
    cfg = {"lora": lf.LoRAConfig(r=4), "dora": lf.DoRAConfig(r=4), "ia3ff": lf.IA3FFConfig()}[name]
    return perturbed(lf.init(model, cfg, seed=seed), scale=0.3, seed=seed + 3)


def reference(model, params, batch):
    """Loss and adapter gradients of one `apply`, computed alone (or the base loss for params=None)."""
    if params is None:
        with torch.no_grad():
            return model(**batch).loss, None
    for t in lf.trainable_leaves(params):
        t.grad = None
    loss = lf.apply(model, params, batch).loss
    loss.backward()
    grads = [t.grad.clone() for t in lf.trainable_leaves(params)]
    for t in lf.trainable_leaves(params):
        t.grad = None
    return loss.detach(), grads


def train_step(model, params, batch):
    leaves = lf.trainable_leaves(params)
    for t in leaves:
        t.grad = None
    loss = lf.apply(model, params, batch).loss
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in leaves]


class Workers:
    """Threads running `fn(i)` ITERATIONS times each; failures are collected, never lost."""

    def __init__(self, *fns) -> None:
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(fn,)) for fn in fns]

    def _run(self, fn) -> None:
        try:
            for i in range(ITERATIONS):
                fn(i)
        except BaseException as e:  # noqa: BLE001 — reported by `join`
            self.errors.append(f"{type(e).__name__}: {e}")

    def join(self) -> None:
        for t in self.threads:
            t.start()
        for t in self.threads:
            t.join()
        assert not self.errors, self.errors[:3]


class ParameterWatch:
    """A thread that keeps checking that every parameter of the model is the original `nn.Parameter`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.original = {n: p for n, p in model.named_parameters()}
        self.stop = threading.Event()
        self.seen: list[str] = []
        self.checks = 0
        self.thread = threading.Thread(target=self._watch)

    def _watch(self) -> None:
        while not self.stop.is_set():
            for name, module in self.model.named_modules():
                for key, p in module._parameters.items():
                    if p is None:  # a registered absence (bias=False)
                        continue
                    full = f"{name}.{key}" if name else key
                    if p is not self.original.get(full) or type(p) is not nn.Parameter:
                        self.seen.append(full)
            self.checks += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        assert self.checks > 0
        assert not self.seen, f"parameters replaced: {sorted(set(self.seen))[:5]}"


def assert_same(got, want) -> None:
    loss, grads = got
    torch.testing.assert_close(loss, want[0], rtol=1e-5, atol=1e-6)
    if want[1] is not None:
        for g, w in zip(grads, want[1], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_plain_calls_in_another_thread_see_the_base_model():
    model = tiny_qwen3()  # parameters require grad, as a freshly built HF model's do
    params = make(model)
    batch = qwen3_batch()
    want_adapted, want_base = reference(model, params, batch), reference(model, None, batch)
    before = snapshot(model)

    def adapted(i):
        assert_same(train_step(model, params, batch), want_adapted)

    def plain(i):
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).loss, want_base[0], rtol=1e-5, atol=1e-6)
        loss = model(**batch).loss  # with grad: the base's own gradient, the user's to take
        assert loss.grad_fn is not None

    with ParameterWatch(model):
        Workers(adapted, plain).join()
    model.zero_grad(set_to_none=True)
    assert_untouched(model, before)


@pytest.mark.parametrize("names", [("lora", "dora"), ("lora", "ia3ff")], ids=["output-forms", "input-form"])
def test_two_threads_with_two_adapters_get_the_outputs_and_gradients_of_sequential_runs(names):
    model = tiny_qwen3()
    p1, p2 = make(model, names[0], seed=0), make(model, names[1], seed=1)
    b1, b2 = qwen3_batch(seed=1), qwen3_batch(seed=2)
    want1, want2 = reference(model, p1, b1), reference(model, p2, b2)
    before = snapshot(model)
    with ParameterWatch(model):
        Workers(
            lambda i: assert_same(train_step(model, p1, b1), want1),
            lambda i: assert_same(train_step(model, p2, b2), want2),
        ).join()
    assert_untouched(model, before)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_two_threads_training_under_gradient_checkpointing(reentrant):
    """Backward recomputes each thread's layers in that thread's graph: each must see its own adapter."""
    model = tiny_qwen3()
    p1, p2 = make(model, "lora", seed=0), make(model, "dora", seed=1)
    b1, b2 = qwen3_batch(seed=1), qwen3_batch(seed=2)
    want1, want2 = reference(model, p1, b1), reference(model, p2, b2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    before = snapshot(model)

    def dropped_output(params, batch, want):
        def step(i):
            leaves = lf.trainable_leaves(params)
            for t in leaves:
                t.grad = None
            loss = lf.apply(model, params, batch).loss / 2  # the output object is gone before backward
            loss.backward()
            assert_same((loss.detach() * 2, [t.grad for t in leaves]), (want[0], [g / 2 for g in want[1]]))

        return step

    with ParameterWatch(model):
        Workers(dropped_output(p1, b1, want1), dropped_output(p2, b2, want2)).join()
    assert_untouched(model, before)


def test_inject_blocks_in_two_threads_at_once():
    model = tiny_qwen3().eval()
    before = snapshot(model)
    p1, p2 = make(model, "lora", seed=0), make(model, "dora", seed=1)
    batch = qwen3_batch()
    with torch.no_grad():
        want = {id(p1): lf.apply(model, p1, batch).logits, id(p2): lf.apply(model, p2, batch).logits}
        base = model(**batch).logits

    def block(params):
        def run(i):
            with torch.no_grad(), lf.inject(model, params):
                for _ in range(3):
                    torch.testing.assert_close(model(**batch).logits, want[id(params)], rtol=1e-5, atol=1e-6)

        return run

    def plain(i):
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, base, rtol=1e-5, atol=1e-6)

    Workers(block(p1), block(p2), plain).join()
    assert_untouched(model, before)  # no dispatcher left on any module


def test_forced_interleaving_a_thread_held_inside_its_forward():
    """Thread A stops inside its injected forward (a user hook on layer 1 waits); meanwhile thread B runs a
    whole training step with another adapter and a plain call, then lets A finish. Both are exact."""
    model = tiny_qwen3()
    p1, p2 = make(model, "lora", seed=0), make(model, "dora", seed=1)
    b1, b2 = qwen3_batch(seed=1), qwen3_batch(seed=2)
    want1, want2, base = reference(model, p1, b1), reference(model, p2, b2), reference(model, None, b2)
    before = snapshot(model)
    inside, done = threading.Event(), threading.Event()
    holder = {}

    def hold(module, args):
        if threading.current_thread() is holder.get("a"):
            inside.set()
            assert done.wait(30), "thread B did not finish"

    handle = model.model.layers[1].register_forward_pre_hook(hold)
    results = {}

    def thread_a():
        results["a"] = train_step(model, p1, b1)

    def thread_b():
        assert inside.wait(30), "thread A never reached its held forward"
        try:
            results["b"] = train_step(model, p2, b2)
            with torch.no_grad():
                results["plain"] = model(**b2).loss
        finally:
            done.set()

    for _ in range(5):
        inside.clear()
        done.clear()
        holder["a"] = threading.Thread(target=thread_a)
        other = threading.Thread(target=thread_b)
        holder["a"].start()
        other.start()
        holder["a"].join()
        other.join()
        assert_same(results["a"], want1)
        assert_same(results["b"], want2)
        torch.testing.assert_close(results["plain"], base[0], rtol=1e-5, atol=1e-6)
    handle.remove()
    assert_untouched(model, before)
