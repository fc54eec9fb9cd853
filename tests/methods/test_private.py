"""`lf.private_grads`, DP-SGD's gradient, against a loop over examples that clips each one by hand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from components import perturbed, qwen3_batch, snapshot, tiny_config, tiny_gpt2, tiny_qwen3
from conftest import assert_untouched, minilm, minilm_batch, tiny_qwen3_4bit
from scipy import stats
from torch import nn

import lora_func as lf
from lora_func import _private
from lora_func.kinds import linear
from lora_func.variants import REGISTRY


def token_losses(labels):
    """Causal LM: each example's mean next-token loss, (N,)."""

    def loss(out):
        return F.cross_entropy(out.logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none").mean(1)

    return loss


def make_params(name, model, batch):
    cfg = tiny_config(name, r=4)
    if REGISTRY[name].calibrated:
        return perturbed(lf.init(model, cfg, seed=0, calibration_data=[batch], progress=False))
    return perturbed(lf.init(model, cfg, seed=0))


def example_grads(model, params, batch, loss_of):
    """The reference's per-example gradients: one autograd backward per example, alone as a batch of one."""
    leaves = [t for _, _, t in lf.split(params)[0].leaves()]
    n = next(iter(batch.values())).shape[0]
    rows = []
    for i in range(n):
        example = {k: v[i : i + 1] for k, v in batch.items()}
        rows.append(torch.autograd.grad(loss_of(example)(lf.apply(model, params, example)).sum(), leaves))
    return rows


def clipped_mean(rows, C, batch_size=None):
    """(Σᵢ gᵢ · min(1, C / (‖gᵢ‖ + 1e-6))) / B, the norm over every leaf of example i."""
    total = [torch.zeros_like(g) for g in rows[0]]
    for grads in rows:
        norm = torch.sqrt(sum(g.double().square().sum() for g in grads)).item()
        factor = min(1.0, C / (norm + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
    return [t / (batch_size or len(rows)) for t in total]


def example_norms(rows):
    return [math.sqrt(sum(g.double().square().sum().item() for g in grads)) for grads in rows]


def assert_equal_to(grads, params, expected):
    names = [(p, k) for p, k, _ in lf.split(params)[0].leaves()]
    assert [(p, k) for p, k, _ in grads.leaves()] == names
    scale = max(e.abs().max().item() for e in expected)
    for (path, leaf), reference in zip(names, expected):
        got = grads[path][leaf]
        assert not got.requires_grad
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5 * scale, msg=f"{path}.{leaf}")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_equals_a_loop_over_examples_with_clipping(name):
    """Every variant: the clipped mean equals the hand loop, with C between the examples' norms so that some
    are clipped and some are not."""
    model = tiny_qwen3()
    batch = qwen3_batch(batch=3)
    params = make_params(name, model, batch)
    rows = example_grads(model, params, batch, lambda example: token_losses(example["labels"]))
    norms = sorted(example_norms(rows))
    C = (norms[0] + norms[1]) / 2  # two examples clipped, one not
    before = snapshot(model)
    grads = lf.private_grads(model, params, batch, token_losses(batch["labels"]), max_grad_norm=C, noise_multiplier=0)
    assert_untouched(model, before)
    assert_equal_to(grads, params, clipped_mean(rows, C))
    assert all(t.grad is None for _, _, t in params.leaves())  # nothing accumulated on the adapter


def _only_book_keeping(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the per-example path ran where book-keeping applies")

    monkeypatch.setattr(_private, "_per_example", refuse)


@pytest.mark.parametrize(
    ("build", "norms"),
    [
        (tiny_qwen3, "direct"),
        (tiny_qwen3, "gram"),
        pytest.param(tiny_qwen3_4bit, "direct", marks=pytest.mark.slow),
        (tiny_gpt2, "gram"),
    ],
    ids=["qwen3-direct", "qwen3-gram", "qwen3-4bit-direct", "gpt2-conv1d-gram"],
)
def test_lora_book_keeping_equals_the_loop(build, norms, monkeypatch):
    """LoRA on linear-like layers takes the book-keeping path (no per-example gradients), with per-example norms
    from the small per-example products or from the Gram trick: both equal the loop."""
    _only_book_keeping(monkeypatch)
    monkeypatch.setattr(_private, "gram_pays", lambda tokens, d, r: norms == "gram")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build()
    batch = qwen3_batch(batch=4)
    params = perturbed(lf.init(model, lf.LoRAConfig(r=4)))
    rows = example_grads(model, params, batch, lambda example: token_losses(example["labels"]))
    norms_ = sorted(example_norms(rows))
    C = (norms_[1] + norms_[2]) / 2
    grads = lf.private_grads(model, params, batch, token_losses(batch["labels"]), max_grad_norm=C, noise_multiplier=0)
    assert_equal_to(grads, params, clipped_mean(rows, C))


@pytest.mark.slow
def test_lora_book_keeping_with_a_padded_batch():
    """BERT with padding: the padded tokens' rows of x and g are part of each example, as in the loop."""
    model = minilm()
    params = perturbed(lf.init(model, lf.LoRAConfig(r=4, target_names=(r"query$", r"value$"))))
    batch = minilm_batch(("Return the base-2 logarithm of x.", "Split.", "Open the file and return a stream.", "Hi"))
    assert not batch["attention_mask"].all()

    def cls_loss(out):
        return out.last_hidden_state[:, 0].square().mean(1)

    rows = example_grads(model, params, batch, lambda example: cls_loss)
    norms = sorted(example_norms(rows))
    C = (norms[1] + norms[2]) / 2
    assert _private._book_keeping_applies(params)
    grads = lf.private_grads(model, params, batch, cls_loss, max_grad_norm=C, noise_multiplier=0)
    assert_equal_to(grads, params, clipped_mean(rows, C))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing(reentrant):
    """Non-reentrant checkpointing: the same gradient. Reentrant checkpointing keeps the adapter's gradient from
    torch.autograd.grad (torch's limitation, for the loop too): refused by name, never a silent zero."""
    model = tiny_qwen3()
    batch = qwen3_batch(batch=3)
    params = perturbed(lf.init(model, lf.LoRAConfig(r=4)))
    rows = example_grads(model, params, batch, lambda example: token_losses(example["labels"]))
    C = sorted(example_norms(rows))[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: the deprecated name
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    kw = dict(max_grad_norm=C, noise_multiplier=0)
    if reentrant:
        with pytest.raises(ValueError, match="reentrant gradient checkpointing"):
            lf.private_grads(model, params, batch, token_losses(batch["labels"]), **kw)
        return
    grads = lf.private_grads(model, params, batch, token_losses(batch["labels"]), **kw)
    assert_equal_to(grads, params, clipped_mean(rows, C))


class Twice(nn.Module):
    """One linear layer applied twice: its per-example gradient is the sum over both calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.lin(torch.tanh(self.lin(x))))


def test_a_layer_called_twice_adds_its_gradients_before_the_norm(monkeypatch):
    _only_book_keeping(monkeypatch)
    model = Twice()
    x = torch.randn(5, 7, 6, generator=torch.Generator().manual_seed(1))
    params = perturbed(lf.init(model, lf.LoRAConfig(r=2, target_names=(r"lin$",))), scale=0.3)

    def loss_of(_):
        return lambda out: out.square().mean((1, 2))

    rows = example_grads(model, params, {"x": x}, loss_of)
    C = sorted(example_norms(rows))[2]
    grads = lf.private_grads(model, params, {"x": x}, loss_of(None), max_grad_norm=C, noise_multiplier=0)
    assert_equal_to(grads, params, clipped_mean(rows, C))


def test_expected_batch_size_divides_instead_of_the_rows():
    model = tiny_qwen3()
    batch = qwen3_batch(batch=3)
    params = perturbed(lf.init(model, lf.LoRAConfig(r=4)))
    rows = example_grads(model, params, batch, lambda example: token_losses(example["labels"]))
    grads = lf.private_grads(
        model,
        params,
        batch,
        token_losses(batch["labels"]),
        max_grad_norm=0.5,
        noise_multiplier=0,
        expected_batch_size=8,
    )
    assert_equal_to(grads, params, clipped_mean(rows, 0.5, batch_size=8))


# ---- the noise -------------------------------------------------------------------------------------------------

# Each statistical check below rejects at a two-sided level of 1e-6 (scipy's exact distributions), so a correct
# implementation fails this file's noise test with probability below 4e-6; the seeds are fixed besides.
LEVEL = 1e-6


def _noise_setup():
    model = tiny_qwen3()
    batch = qwen3_batch(batch=2)
    params = perturbed(lf.init(model, lf.LoRAConfig(r=4)))
    return model, params, batch, token_losses(batch["labels"])


def test_noise_is_gaussian_with_std_sigma_C_over_B():
    model, params, batch, loss = _noise_setup()
    C, sigma, B = 0.7, 1.3, 5
    clean = lf.private_grads(model, params, batch, loss, max_grad_norm=C, noise_multiplier=0, expected_batch_size=B)
    generator = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(4):  # four calls in a row from one generator: independent draws every call
        noisy = lf.private_grads(
            model,
            params,
            batch,
            loss,
            max_grad_norm=C,
            noise_multiplier=sigma,
            generator=generator,
            expected_batch_size=B,
        )
        draws.append(torch.cat([(noisy[p][k] - clean[p][k]).flatten() for p, k, _ in clean.leaves()]))
    z = (torch.stack(draws).double() * B / (sigma * C)).flatten().numpy()  # should be iid N(0, 1)
    n = z.size
    assert n > 30_000
    # mean: √n z̄ ~ N(0, 1)
    assert abs(z.mean() * math.sqrt(n)) < stats.norm.isf(LEVEL / 2)
    # variance: Σ z² ~ χ²(n)
    lo, hi = stats.chi2.ppf(LEVEL / 2, n), stats.chi2.isf(LEVEL / 2, n)
    assert lo < (z**2).sum() < hi
    # shape: Kolmogorov–Smirnov against N(0, 1)
    assert stats.kstest(z, "norm").pvalue > LEVEL
    # independence between calls: the correlation of two calls' draws, √n r ~ N(0, 1) approximately
    a, b = draws[0].double().numpy(), draws[1].double().numpy()
    r = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
    assert abs(r * math.sqrt(a.size)) < stats.norm.isf(LEVEL / 2)


def test_seeded_calls_are_reproducible_bit_for_bit_and_none_uses_the_global_generator():
    model, params, batch, loss = _noise_setup()

    def call(generator):
        return lf.private_grads(
            model, params, batch, loss, max_grad_norm=1.0, noise_multiplier=1.0, generator=generator
        )

    first, second = call(torch.Generator().manual_seed(5)), call(torch.Generator().manual_seed(5))
    other = call(torch.Generator().manual_seed(6))
    state = torch.get_rng_state()
    call(torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)  # a given generator leaves the global one alone
    torch.manual_seed(5)
    global_ = call(None)
    assert not torch.equal(torch.get_rng_state(), state)
    for path, leaf, g in first.leaves():
        assert torch.equal(g, second[path][leaf])
        assert torch.equal(g, global_[path][leaf])  # the global generator seeded alike draws alike
        assert not torch.equal(g, other[path][leaf])


def test_an_empty_poisson_draw_is_the_noise_alone():
    model, params, batch, loss = _noise_setup()
    empty = {k: v[:0] for k, v in batch.items()}
    grads = lf.private_grads(
        model,
        params,
        empty,
        loss,
        max_grad_norm=0.5,
        noise_multiplier=2.0,
        generator=torch.Generator().manual_seed(1),
        expected_batch_size=4,
    )
    generator = torch.Generator().manual_seed(1)
    for _, _, g in grads.leaves():
        torch.testing.assert_close(g, torch.normal(0.0, 1.0, size=g.shape, generator=generator) / 4, rtol=1e-6, atol=0)


def test_zero_noise_draws_nothing():
    model, params, batch, loss = _noise_setup()
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    lf.private_grads(model, params, batch, loss, max_grad_norm=1.0, noise_multiplier=0, generator=generator)
    assert torch.equal(generator.get_state(), state)


# ---- bad input, and what an exception leaves -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(max_grad_norm=0.0), ValueError, "`max_grad_norm` must be > 0"),
        (dict(max_grad_norm=-1.0), ValueError, "`max_grad_norm` must be > 0"),
        (dict(max_grad_norm=float("nan")), ValueError, "`max_grad_norm` must be finite"),
        (dict(max_grad_norm=float("inf")), ValueError, "`max_grad_norm` must be finite"),
        (dict(max_grad_norm=True), TypeError, "`max_grad_norm` must be a real number"),
        (dict(max_grad_norm="1"), TypeError, "`max_grad_norm` must be a real number"),
        (dict(noise_multiplier=-0.5), ValueError, "`noise_multiplier` must be >= 0"),
        (dict(noise_multiplier=float("inf")), ValueError, "`noise_multiplier` must be finite"),
        (dict(noise_multiplier=None), TypeError, "`noise_multiplier` must be a real number"),
        (dict(generator=0), TypeError, "`generator` must be a torch.Generator"),
        (dict(expected_batch_size=0), ValueError, "`expected_batch_size` must be > 0"),
        (dict(expected_batch_size=2.5), TypeError, "`expected_batch_size` must be a positive int"),
        (dict(expected_batch_size=True), TypeError, "`expected_batch_size` must be a positive int"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, error, match):
    model, params, batch, loss = _noise_setup()
    arguments = dict(max_grad_norm=1.0, noise_multiplier=1.0) | kwargs
    with pytest.raises(error, match=match):
        lf.private_grads(model, params, batch, loss, **arguments)


def test_bad_batch_loss_and_params_are_refused_by_name():
    model, params, batch, loss = _noise_setup()
    kw = dict(max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="`batch` has no rows.*give `expected_batch_size`"):
        lf.private_grads(model, params, {k: v[:0] for k, v in batch.items()}, loss, **kw)
    with pytest.raises(ValueError, match="`loss` must return the 2 per-example losses, shape \\(2,\\); got \\(\\)"):
        lf.private_grads(model, params, batch, lambda out: loss(out).sum(), **kw)
    with pytest.raises(TypeError, match="`loss` must be a callable"):
        lf.private_grads(model, params, batch, None, **kw)
    with pytest.raises(ValueError, match="private_grads"):
        lf.private_grads(model, lf.stack([params, params]), batch, loss, **kw)


def test_an_exception_in_the_loss_leaves_nothing_behind():
    model, params, batch, loss = _noise_setup()
    before = snapshot(model)

    def broken(out):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lf.private_grads(model, params, batch, broken, max_grad_norm=1.0, noise_multiplier=1.0)
    assert getattr(linear._recording, "record", None) is None
    assert_untouched(model, before)
    # the next ordinary step computes LoRA's gradients as usual
    leaves = lf.trainable_leaves(params)
    grads = torch.autograd.grad(lf.apply(model, params, batch).loss, leaves)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
