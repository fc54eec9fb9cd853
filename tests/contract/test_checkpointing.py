"""Invariant 10: under HF gradient checkpointing (reentrant and not), adapter gradients equal those of the same
loop without it, in every way real loops call backward — for every variant.

The idioms: the output object dropped before backward (`loss = lf.apply(...).loss / k`), two `apply` losses
summed into one backward, `retain_graph=True` and a second backward, `torch.autograd.grad`; and across
adapters: two different adapters, or an adapter and the base model, in one backward. Each test also checks
that once the backward has run nothing of lora_func is left on the model, and that the base (whose
parameters require grad, as a freshly built HF model's do) gets no gradient.
"""

from __future__ import annotations

import gc

import pytest
import torch
from components import hook_count, tiny_config
from conftest import assert_untouched, perturbed, qwen3_batch, snapshot, tiny_qwen3

import lora_func as lf
from lora_func.variants import REGISTRY

VARIANTS = sorted(REGISTRY)
MODES = {"reentrant": True, "non-reentrant": False}


def make(name: str, model, seed: int = 0) -> lf.Params:
    variant = REGISTRY[name]
    calibration = [qwen3_batch(seed=7)] if variant.calibrated else None
    return perturbed(
        lf.init(model, tiny_config(variant.name, r=4), seed=seed, calibration_data=calibration), seed=seed + 3
    )


def grads_of(params: lf.Params, run) -> list[torch.Tensor]:
    leaves = lf.trainable_leaves(params)
    for t in leaves:
        t.grad = None
    run()
    out = []
    for t in leaves:
        assert t.grad is not None, "an adapter leaf got no gradient"
        out.append(t.grad.clone())
        t.grad = None
    return out


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def checkpointed(model, reentrant: bool):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model


def nothing_left(model, before) -> None:
    assert_untouched(model, before)  # the model as it was: no dispatcher left on any module, no base gradient


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", VARIANTS)
def test_every_backward_idiom_gives_the_gradients_of_the_loop_without_checkpointing(name, mode):
    model = tiny_qwen3()
    params = make(name, model)
    b1, b2 = qwen3_batch(seed=1), qwen3_batch(seed=2)
    # References, without checkpointing.
    ref_one = grads_of(params, lambda: lf.apply(model, params, b1).loss.backward())
    ref_two = grads_of(params, lambda: (lf.apply(model, params, b1).loss + lf.apply(model, params, b2).loss).backward())
    ref_sq = grads_of(params, lambda: lf.apply(model, params, b1).logits.pow(2).mean().backward())

    checkpointed(model, MODES[mode])
    before = snapshot(model)

    # The gradient-accumulation idiom: the output object is gone before backward.
    got = grads_of(params, lambda: (lf.apply(model, params, b1).loss / 4).backward())
    assert_same([g * 4 for g in got], ref_one)
    nothing_left(model, before)

    # Two losses, one backward.
    got = grads_of(params, lambda: (lf.apply(model, params, b1).loss + lf.apply(model, params, b2).loss).backward())
    assert_same(got, ref_two)
    nothing_left(model, before)

    # retain_graph, then a second backward through the same output.
    def retained():
        out = lf.apply(model, params, b1)
        got_sq = grads_of(params, lambda: out.logits.pow(2).mean().backward(retain_graph=True))
        return got_sq, grads_of(params, out.loss.backward)

    got_sq, got = retained()
    assert_same(got_sq, ref_sq)
    assert_same(got, ref_one)
    nothing_left(model, before)

    # torch.autograd.grad. Reentrant checkpointing cannot serve it (torch's own limit: its layers join the
    # graph only when backward recomputes them), and says so with an error, never a wrong or None gradient.
    trainable = lf.trainable_leaves(params)
    if MODES[mode]:
        with pytest.raises(RuntimeError, match="not have been used in the graph|incompatible with .grad"):
            torch.autograd.grad(lf.apply(model, params, b1).loss, trainable)
    else:
        assert_same(list(torch.autograd.grad(lf.apply(model, params, b1).loss, trainable)), ref_one)
    nothing_left(model, before)


@pytest.mark.parametrize("mode", list(MODES))
def test_two_adapters_and_the_base_model_in_one_checkpointed_backward(mode):
    """Each recompute runs with the adapter (or none) of the call that made it: exact gradients."""
    model = tiny_qwen3()
    p1, p2 = make("lora", model, seed=0), make("dora", model, seed=1)
    b1, b2 = qwen3_batch(seed=1), qwen3_batch(seed=2)

    def loss():
        # The base call comes first and last: its recomputes must see no adapter, wherever they fall.
        base_first = model(**b2).logits.pow(2).mean()
        total = lf.apply(model, p1, b1).loss + lf.apply(model, p2, b2).loss + base_first
        return total + model(**b1).logits.pow(2).mean()

    def run():
        model.zero_grad(set_to_none=True)
        for t in lf.trainable_leaves(p1) + lf.trainable_leaves(p2):
            t.grad = None
        loss().backward()
        grads = {name: [t.grad.clone() for t in lf.trainable_leaves(p)] for name, p in (("p1", p1), ("p2", p2))}
        grads["base"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return grads

    ref = run()
    checkpointed(model, MODES[mode])
    got = run()
    assert_same(got["p1"], ref["p1"])
    assert_same(got["p2"], ref["p2"])
    # The base model's own calls train the base (their gradients are the user's to take) exactly as without
    # checkpointing; the adapted calls add nothing to them.
    assert got["base"].keys() == ref["base"].keys() and ref["base"]
    for n in ref["base"]:
        torch.testing.assert_close(got["base"][n], ref["base"][n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", [*MODES, "off"])
def test_outputs_of_an_inject_block_differentiate_after_it_exits(mode):
    model = tiny_qwen3()
    params = make("lora", model)
    b1, b2 = qwen3_batch(seed=1), qwen3_batch(seed=2)
    ref = grads_of(params, lambda: (lf.apply(model, params, b1).loss + lf.apply(model, params, b2).loss).backward())
    if mode != "off":
        checkpointed(model, MODES[mode])
    before = snapshot(model)
    with lf.inject(model, params):
        loss = model(**b1).loss + model(**b2).loss
    plain = model(**b1).loss  # after the block: the base model
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch.testing.assert_close(plain, tiny_qwen3()(**b1).loss)
    assert_same(grads_of(params, loss.backward), ref)
    del loss, plain
    model.zero_grad(set_to_none=True)
    nothing_left(model, before)


@pytest.mark.parametrize("mode", list(MODES))
def test_a_backward_that_fails_leaves_nothing_behind_once_the_graph_is_freed(mode):
    model = checkpointed(tiny_qwen3(), MODES[mode])
    params = make("lora", model)
    before = snapshot(model)

    def fail(grad):
        raise ZeroDivisionError

    # The backward fails between the layers: layer 1 was reached (its record entered), layer 0 not yet.
    handle = model.model.layers[0].register_forward_hook(lambda m, args, out: out.register_hook(fail) and None)
    loss = lf.apply(model, params, qwen3_batch()).loss
    handle.remove()
    with pytest.raises(ZeroDivisionError):
        loss.backward()
    # layer 0's record is held by the graph the failed backward left: the dispatchers stay, inert, until it goes
    assert hook_count(model) > before["hooks"]
    del loss
    gc.collect()
    nothing_left(model, before)


def test_base_parameters_that_require_grad_get_no_gradient_and_keep_their_flags():
    model = tiny_qwen3()
    assert all(p.requires_grad for p in model.parameters())
    params = make("lora", model)
    before = snapshot(model)
    for mode in (None, True, False):
        if mode is not None:
            checkpointed(model, mode)
            before = snapshot(model)
        lf.apply(model, params, qwen3_batch()).loss.backward()
        assert all(p.grad is None for p in model.parameters())
        assert all(p.requires_grad for p in model.parameters())
        nothing_left(model, before)


def test_a_submodule_called_directly_on_a_trainable_base_trains_the_adapter_only():
    """Base gradients are kept out around each module owning a trainable base parameter, so a part of the model
    called directly inside the block (a probe, a loop over the layers) gets the adapter and gives the base no
    gradient: outputs and adapter gradients equal those on a frozen copy of the base."""
    model = tiny_qwen3()
    params = make("lora", model)
    x = torch.randn(2, 5, 64)

    def run(m):
        leaves = lf.trainable_leaves(params)
        with lf.inject(m, params):
            y = m.model.layers[0].mlp(m.model.layers[0].self_attn.q_proj(x)[..., :64])
        y.square().sum().backward()
        grads = [None if t.grad is None else t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
        return y.detach(), grads

    out, grads = run(model)
    assert sum(g is not None for g in grads) == 8  # A and B of layer 0's q_proj and its three mlp projections
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    frozen = tiny_qwen3().requires_grad_(False)
    frozen.load_state_dict(model.state_dict())
    ref_out, ref_grads = run(frozen)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert [g is None for g in grads] == [g is None for g in ref_grads]
    assert_same([g for g in grads if g is not None], [g for g in ref_grads if g is not None])
    with torch.no_grad():
        base = model.model.layers[0].self_attn.q_proj(x)
        with lf.inject(model, params):
            assert not torch.allclose(base, model.model.layers[0].self_attn.q_proj(x))
