"""Ctrl-C anywhere (invariant 13): a `KeyboardInterrupt` raised from inside a module's forward, at each stage where
lora_func has something pushed or recorded (a forward with grad, a forward under HF gradient checkpointing, the
recompute inside a backward, a decoding step of `generate`), leaves nothing behind: the model is as it was, and
the thread's next plain training step of the base gets exactly the gradients a model that never saw lora_func
gets; the next `lf.apply` is correct again. What the failed call took is released when it raises, while the
exception (and the partial graph its traceback holds) is still alive.

The interrupt is a user's forward hook that raises on its k-th call, as Ctrl-C in a notebook lands anywhere.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from components import tiny_config
from conftest import assert_untouched, hook_count, perturbed, qwen3_batch, snapshot, tiny_qwen3

import lora_func as lf
from lora_func._inject.checkpoint import LayerCall
from lora_func.variants import REGISTRY

VARIANTS = sorted(REGISTRY)


class InterruptOn:
    """A forward hook that raises `exc` on its k-th call."""

    def __init__(self, k: int, exc: type[BaseException] = KeyboardInterrupt) -> None:
        self.k, self.calls, self.exc = k, 0, exc

    def __call__(self, module, args, output=None):  # a forward hook, or a pre-hook
        self.calls += 1
        if self.calls == self.k:
            raise self.exc("interrupted")


def make(name: str, model, seed: int = 0) -> lf.Params:
    variant = REGISTRY[name]
    calibration = [qwen3_batch(seed=7)] if variant.calibrated else None
    return perturbed(
        lf.init(model, tiny_config(variant.name, r=4), seed=seed, calibration_data=calibration), seed=seed + 3
    )


def plain_grads(model) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**qwen3_batch()).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def adapter_run(model, params):
    """Loss and adapter gradients of one `lf.apply`, and whether any base parameter got a gradient."""
    leaves = lf.trainable_leaves(params)
    for t in leaves:
        t.grad = None
    loss = lf.apply(model, params, qwen3_batch()).loss
    loss.backward()
    base_grads = [n for n, p in model.named_parameters() if p.grad is not None]
    return loss.detach(), [t.grad.clone() for t in leaves], base_grads


def assert_clean_thread(model, before, reference_grads):
    """Nothing left: the model as it was, and a plain training step of the base trains every base parameter."""
    assert_untouched(model, before)
    grads = plain_grads(model)
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    for n, g in grads.items():
        torch.testing.assert_close(g, reference_grads[n], rtol=1e-5, atol=1e-7, msg=n)
    assert all(p.requires_grad for p in model.parameters())


STAGES = {
    # stage: (HF checkpointing (None, reentrant), which call of the hooked module raises; "backward": its output's
    # gradient, in backward)
    "forward": (None, 1),
    "backward": (None, "backward"),
    "forward-ckpt-reentrant": (True, 1),
    "forward-ckpt": (False, 1),
    "recompute-reentrant": (True, 2),
    "recompute": (False, 2),
}
# LoRA (the output form), and the variants whose targets run by parameters in a call of one adapter (their mode is
# pushed on the hooked module when the interrupt comes)
PARAMETER_FORM = ("shira", "fourierft", "ln_tuning")


def interrupted_module(model, name):
    """The hooked module: a target of `name` in the second layer."""
    layer = model.model.layers[1]
    return layer.post_attention_layernorm if name == "ln_tuning" else layer.mlp.down_proj


def raise_in_backward(exc):
    """A forward hook that makes the module output's gradient raise `exc` in backward."""

    def hook(module, args, output):
        def interrupt(grad):
            raise exc("interrupted")

        output.register_hook(interrupt)

    return hook


APPLY_CASES = [("lora", stage, exc) for stage in STAGES for exc in (KeyboardInterrupt, RuntimeError)] + [
    (name, stage, KeyboardInterrupt) for name in PARAMETER_FORM for stage in STAGES
]


@pytest.mark.parametrize(
    ("name", "stage", "exc"), APPLY_CASES, ids=[f"{n}-{s}-{e.__name__}" for n, s, e in APPLY_CASES]
)
def test_interrupt_in_apply_leaves_nothing(name, stage, exc):
    reentrant, k = STAGES[stage]
    model = tiny_qwen3(num_hidden_layers=2)
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    reference = plain_grads(model)
    params = make(name, model)
    expected = adapter_run(model, params)
    before = snapshot(model)

    # After ours in the hook order: raised while lora_func's own modes are pushed for this module.
    module = interrupted_module(model, name)
    if k == "backward":
        handle = module.register_forward_hook(raise_in_backward(exc))
    elif k == 2 and name != "lora":
        # A non-reentrant recompute stops once it has what backward saved: a target run by parameters has its
        # input and W + ΔW before its forward ends, so the interrupt comes at its start.
        handle = module.register_forward_pre_hook(InterruptOn(k, exc))
    else:
        handle = module.register_forward_hook(InterruptOn(k, exc))
    hooks = hook_count(model)
    with pytest.raises(exc) as raised:
        lf.apply(model, params, qwen3_batch()).loss.backward()
    handle.remove()
    # Released at the raise, while the traceback (holding the partial graph) is alive; for a failed backward,
    # what remains is held by the graph of a loss the test no longer has: the traceback's frames.
    if k == 1:
        assert hook_count(model) == hooks - 1
    del raised
    assert_clean_thread(model, before, reference)

    loss, grads, base_grads = adapter_run(model, params)  # the next apply: as if nothing had happened
    assert base_grads == []
    torch.testing.assert_close(loss, expected[0])
    for g, e in zip(grads, expected[1]):
        torch.testing.assert_close(g, e)
    assert_untouched(model, before)


@pytest.mark.parametrize("name", VARIANTS)
def test_interrupt_mid_forward_every_variant(name):
    """Every variant, with HF checkpointing (the most state: modes, layer records): Ctrl-C in the second layer."""
    model = tiny_qwen3(num_hidden_layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = plain_grads(model)
    params = make(name, model)
    expected = adapter_run(model, params)
    before = snapshot(model)
    handle = model.model.layers[1].mlp.register_forward_hook(InterruptOn(1))
    with pytest.raises(KeyboardInterrupt):
        with lf.inject(model, params):
            model(**qwen3_batch()).loss.backward()
    handle.remove()
    assert_clean_thread(model, before, reference)
    loss, grads, base_grads = adapter_run(model, params)
    assert base_grads == []
    torch.testing.assert_close(loss, expected[0])
    for g, e in zip(grads, expected[1]):
        torch.testing.assert_close(g, e)


RECOMPUTE_CASES = [(n, KeyboardInterrupt) for n in VARIANTS] + [(n, RuntimeError) for n in ("lora", "vera", "dora")]


@pytest.mark.parametrize(("name", "exc"), RECOMPUTE_CASES, ids=[f"{n}-{e.__name__}" for n, e in RECOMPUTE_CASES])
def test_interrupt_in_recompute_frees_the_graph_every_variant(name, exc):
    """Raised inside the non-reentrant recompute of the last layer, in backward, once the autograd engine had queued
    other nodes of the graph: after the exception and the loss are gone, nothing of the graph is left (the engine
    keeps the nodes it had queued until the thread's next backward; lora_func drops them when the backward fails).
    No dispatcher, no layer record, the first layer's output freed; the next apply trains as on a fresh model."""
    model = tiny_qwen3(num_hidden_layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = plain_grads(model)
    params = make(name, model)
    fresh = tiny_qwen3(num_hidden_layers=2)
    fresh.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    expected = adapter_run(fresh, params)
    before = snapshot(model)

    outputs = []  # the first layer's output (its forward; backward fails before its recompute): held by the graph
    keep = model.model.layers[0].register_forward_hook(lambda m, a, out: outputs.append(weakref.ref(out)) and None)
    # Before the linear: a recompute stops once it has what backward needs, which for variants that do not adapt
    # `down_proj` is its linear's input; 2: the recompute.
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(InterruptOn(2, exc))
    with pytest.raises(exc):
        lf.apply(model, params, qwen3_batch()).loss.backward()
    handle.remove()
    keep.remove()
    gc.collect()
    assert len(outputs) == 1 and outputs[0]() is None, "the graph outlived the failed backward"
    assert not [o for o in gc.get_objects() if type(o) is LayerCall], "a layer record outlived its graph"
    assert_clean_thread(model, before, reference)

    loss, grads, base_grads = adapter_run(model, params)
    assert base_grads == []
    torch.testing.assert_close(loss, expected[0])
    for g, e in zip(grads, expected[1], strict=True):
        torch.testing.assert_close(g, e)
    assert_untouched(model, before)


@pytest.mark.parametrize("name", ["lora", *PARAMETER_FORM])
def test_interrupt_in_generate(name):
    model = tiny_qwen3(num_hidden_layers=2).eval()
    reference = plain_grads(model.train())
    model.eval()
    params = make(name, model)
    prompt = qwen3_batch(batch=1, seq=4)["input_ids"]
    with lf.inject(model, params):
        expected = model.generate(prompt, max_new_tokens=4, do_sample=False)
    before = snapshot(model)
    handle = interrupted_module(model, name).register_forward_hook(InterruptOn(3))  # the third decoding step
    with pytest.raises(KeyboardInterrupt):
        with lf.inject(model, params):
            model.generate(prompt, max_new_tokens=4, do_sample=False)
    handle.remove()
    assert_untouched(model, before)
    with lf.inject(model, params):
        assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), expected)
    model.train()
    assert_clean_thread(model, snapshot(model), reference)


def test_outputs_of_earlier_forwards_in_a_failed_block_still_train():
    """An inject block whose second forward is interrupted: the first forward's output (HF checkpointing) still
    differentiates correctly after the block; only the interrupted forward's records are released."""
    model = tiny_qwen3(num_hidden_layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = make("lora", model)
    expected = adapter_run(model, params)
    before = snapshot(model)
    handle = model.model.layers[1].register_forward_hook(InterruptOn(2))
    with pytest.raises(KeyboardInterrupt):
        with lf.inject(model, params):
            loss = model(**qwen3_batch()).loss
            model(**qwen3_batch())
    handle.remove()
    for t in lf.trainable_leaves(params):
        t.grad = None
    loss.backward()
    for t, e in zip(lf.trainable_leaves(params), expected[1]):
        torch.testing.assert_close(t.grad, e)
    assert_untouched(model, before)
