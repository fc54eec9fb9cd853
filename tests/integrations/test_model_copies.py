"""A copy of the model made inside a block (`copy.deepcopy`, `torch.save`/`torch.load` of the whole module: how EMA,
teacher and reference models are made) carries nothing of lora_func: a later `lf.apply` on the copy runs the adapter
once, equal to the same adapter on a fresh model of the same weights, for every variant; after its first call no
lora_func hook is left on the copy, and the copy's plain calls are the base model's."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from components import tiny_config
from conftest import hook_count, perturbed, qwen3_batch, tiny_qwen3

import lora_func as lf
from lora_func.variants import REGISTRY

VARIANTS = sorted(REGISTRY)


def deepcopy(model):
    return copy.deepcopy(model)


def save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": deepcopy, "torch.save": save_load}


def make(name, model):
    variant = REGISTRY[name]
    calibration = [qwen3_batch(seed=7)] if variant.calibrated else None
    return perturbed(lf.init(model, tiny_config(variant.name, r=4), seed=0, calibration_data=calibration))


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("name", VARIANTS)
def test_copy_made_inside_a_block_runs_the_adapter_once(name, how):
    model = tiny_qwen3(num_hidden_layers=1)
    batch = qwen3_batch()
    params = make(name, model)
    with torch.no_grad():
        reference = lf.apply(tiny_qwen3(num_hidden_layers=1), params, batch).logits  # same weights, fresh
        base = model(**batch).logits
    hooks = hook_count(model)
    with lf.inject(model, params):
        copied = COPIES[how](model)  # e.g. an EMA or reference model made mid-training
    assert hook_count(model) == hooks
    with torch.no_grad():
        torch.testing.assert_close(copied(**batch).logits, base, rtol=0, atol=0)  # plain: the base model
        assert hook_count(copied) == hooks  # the copied dispatchers removed themselves
        torch.testing.assert_close(lf.apply(copied, params, batch).logits, reference, rtol=1e-5, atol=1e-6)
    assert hook_count(copied) == hooks


def test_copy_inside_a_block_under_checkpointing_trains_like_the_original():
    """A reference model copied while an HF-checkpointed output awaits its backward: the copy's adapter gradients
    equal the original's."""
    model = tiny_qwen3(num_hidden_layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = qwen3_batch()
    params = make("lora", model)
    with lf.inject(model, params):
        loss = model(**batch).loss
        copied = copy.deepcopy(model)
    loss.backward()
    expected = [t.grad.clone() for t in lf.trainable_leaves(params)]
    for t in lf.trainable_leaves(params):
        t.grad = None
    lf.apply(copied, params, batch).loss.backward()
    for t, e in zip(lf.trainable_leaves(params), expected):
        torch.testing.assert_close(t.grad, e)
    assert not [n for n, p in copied.named_parameters() if p.grad is not None]
