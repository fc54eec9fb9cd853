"""Per-example adapter gradients and gradient dot products (data attribution), against loops over examples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_untouched,
    minilm,
    minilm_batch,
    perturbed,
    qwen3_batch,
    snapshot,
    tiny_qwen3,
    tiny_qwen3_4bit,
)

import lora_func as lf


def token_losses(labels):
    """Causal LM: each example's mean next-token loss, (N,)."""

    def loss(out):
        return F.cross_entropy(out.logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none").mean(1)

    return loss


def loop_grads(model, params, batch, loss):
    """The reference: one autograd backward per example, each example alone as a batch of one."""
    trainable = lf.split(params)[0]
    leaves = [t for _, _, t in trainable.leaves()]
    n = batch["input_ids"].shape[0]
    rows = []
    for i in range(n):
        example = {k: v[i : i + 1] for k, v in batch.items()}
        rows.append(torch.autograd.grad(loss(example)(lf.apply(model, params, example)).sum(), leaves))
    return [torch.stack(per_leaf) for per_leaf in zip(*rows)]


def assert_grads_equal(grads, params, expected, rtol=1e-5, atol=1e-6):
    names = [(p, k) for p, k, _ in lf.split(params)[0].leaves()]
    assert [(p, k) for p, k, _ in grads.leaves()] == names
    for (path, leaf), reference in zip(names, expected):
        torch.testing.assert_close(grads[path][leaf], reference, rtol=rtol, atol=atol, msg=f"{path}.{leaf}")


@pytest.mark.parametrize("build", [tiny_qwen3, tiny_qwen3_4bit], ids=["qwen3", "qwen3-4bit"])
def test_per_example_grads_equal_a_loop_over_examples(build):
    model = build()
    params = perturbed(lf.init(model, lf.DeLoRAConfig(r=4)))  # a frozen half too
    batch = qwen3_batch(batch=4)
    before = snapshot(model)
    grads = lf.per_example_grads(model, params, batch, token_losses(batch["labels"]))
    assert_untouched(model, before)
    expected = loop_grads(model, params, batch, lambda example: token_losses(example["labels"]))
    assert_grads_equal(grads, params, expected)
    for _, _, t in params.leaves():
        assert t.grad is None  # functional: nothing accumulated on the adapter


def test_per_example_grads_with_padding_and_attention_mask():
    """BERT with a padded batch: HF's mask code branches on `attention_mask.all()`, which vmap over the
    model cannot run; the helper runs the real batch, so it works."""
    model = minilm()
    params = perturbed(lf.init(model, lf.LoRAConfig(r=4, target_names=(r"query$", r"value$"))))
    batch = dict(minilm_batch())
    assert not batch["attention_mask"].all()  # the batch really is padded

    def cls_loss(out):
        return out.last_hidden_state[:, 0].square().mean(1)

    grads = lf.per_example_grads(model, params, batch, cls_loss)
    expected = loop_grads(model, params, batch, lambda example: cls_loss)
    assert_grads_equal(grads, params, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError, match="data-dependent control flow"):
        trainable, frozen = lf.split(params)

        def example_loss(t, example):
            one = {k: v.unsqueeze(0) for k, v in example.items()}
            return cls_loss(lf.apply(model, lf.combine(t, frozen), one)).sum()

        torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0))(trainable, batch)


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented")
def test_vmap_grad_recipe_over_examples_equals_the_helper():
    """The torch.func recipe, `vmap(grad(loss), in_dims=(None, 0))`, equals the loop and the helper
    (for models without a padding mask; see the test above)."""
    model = tiny_qwen3()
    params = perturbed(lf.init(model, lf.LoRAConfig(r=4)))
    batch = qwen3_batch(batch=3)
    trainable, frozen = lf.split(params)

    def example_loss(t, example):
        one = {k: v.unsqueeze(0) for k, v in example.items()}  # a batch of one
        return lf.apply(model, lf.combine(t, frozen), one).loss

    recipe = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0))(trainable, batch)
    assert_grads_equal(recipe, params, loop_grads(model, params, batch, lambda example: lambda out: out.loss))
    helper = lf.per_example_grads(model, params, batch, token_losses(batch["labels"]))
    for path, leaf, g in helper.leaves():
        torch.testing.assert_close(recipe[path][leaf], g, rtol=1e-5, atol=1e-6, msg=f"{path}.{leaf}")


def test_grad_dots_scores_training_examples_for_a_query():
    model = tiny_qwen3()
    params = perturbed(lf.init(model, lf.LoRAConfig(r=4)))
    train = qwen3_batch(batch=4, seed=1)
    query = {k: v[[2, 0]] for k, v in train.items()}  # queries that are training examples 2 and 0
    g_train = lf.per_example_grads(model, params, train, token_losses(train["labels"]))
    g_query = lf.per_example_grads(model, params, query, token_losses(query["labels"]))
    scores = lf.grad_dots(g_query, g_train)
    flat_train = torch.cat([t.flatten(1) for _, _, t in g_train.leaves()], dim=1)  # (4, n_params)
    flat_query = torch.cat([t.flatten(1) for _, _, t in g_query.leaves()], dim=1)
    torch.testing.assert_close(scores, flat_query @ flat_train.T, rtol=1e-5, atol=1e-6)
    cosine = lf.grad_dots(g_query, g_train, normalize=True)
    expected = F.normalize(flat_query, dim=1) @ F.normalize(flat_train, dim=1).T
    torch.testing.assert_close(cosine, expected, rtol=1e-5, atol=1e-6)
    assert cosine.argmax(dim=1).tolist() == [2, 0]  # an example is most similar to itself
    torch.testing.assert_close(cosine[[0, 1], [2, 0]], torch.ones(2), rtol=0, atol=1e-5)


def test_per_example_bad_input():
    model = tiny_qwen3()
    params = lf.init(model, lf.LoRAConfig(r=4))
    batch = qwen3_batch(batch=2)
    with pytest.raises(ValueError, match=r"`loss` must return the 2 per-example losses, shape \(2,\); got \(\)"):
        lf.per_example_grads(model, params, batch, lambda out: out.loss)
    with pytest.raises(ValueError, match="no tensor whose dim 0 holds the examples"):
        lf.per_example_grads(model, params, {"use_cache": False}, lambda out: out.loss)
    with pytest.raises(TypeError, match=r"`params` must be lora_func Params"):
        lf.per_example_grads(model, {"A": torch.zeros(1)}, batch, lambda out: out.loss)
    g = lf.per_example_grads(model, params, batch, token_losses(batch["labels"]))
    q_only = lf.init(model, lf.LoRAConfig(r=4, target_names=(r"q_proj$",)))
    other = lf.per_example_grads(model, q_only, batch, token_losses(batch["labels"]))
    with pytest.raises(ValueError, match=r"`query` and `train` have different leaves"):
        lf.grad_dots(g, other)
    with pytest.raises(ValueError, match=r"leaf .*\.A is \(4, 64\) in `query` and \(2, 4, 64\) in `train`"):
        lf.grad_dots(lf.split(params)[0], g)
