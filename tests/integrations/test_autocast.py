"""Training under `torch.autocast`, as AMP loops run it: bf16 on the CPU, and fp16 with a `GradScaler`.

The reference is the dense merge run through `functional_call` (no adapter path of lora_func's at all): the
adapter under autocast must be as close to the float32 reference, in output and in every leaf's gradient, as
that dense reference under the same autocast is (twice its error, plus a floor of the dtype's rounding). A variant
with no weight form (`Intervention`: ReFT) is referenced by plain forward hooks applying its formula instead.
"""

from __future__ import annotations

import pytest
import torch
from components import perturbed, qwen3_batch, tiny_config, tiny_qwen3

import lora_func as lf
from lora_func._variant import Intervention
from lora_func.variants import REGISTRY, variant_for

VARIANTS = sorted(REGISTRY)
FLOOR = {torch.bfloat16: 4e-3, torch.float16: 5e-4}  # about one rounding of the dtype, relative


def setup(name: str):
    model = tiny_qwen3(num_hidden_layers=1)
    batch = qwen3_batch()
    kwargs = {"calibration_data": [batch], "progress": False} if REGISTRY[name].calibrated else {}
    params = perturbed(lf.init(model, tiny_config(name, r=4), seed=0, **kwargs), scale=0.1)
    return model, batch, params


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.float().flatten() for t in tensors])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def dense_reference(model, params, batch, leaves, dtype=None):
    """Logits and leaf gradients of `functional_call(model, lf.merge(...))`, under autocast to `dtype` if given."""
    if variant_for(params.config).capability(Intervention) is not None:
        return reft_reference(model, params, batch, leaves, dtype)
    merged = lf.merge(model, params)  # outside autocast: float32 weights, differentiable in the leaves
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = torch.func.functional_call(model, merged, (), batch)
    return out.logits.float(), flat(torch.autograd.grad(out.loss, leaves))


def reft_reference(model, params, batch, leaves, dtype=None):
    """LoReFT (the default config) by plain forward hooks on the blocks: h + Rᵀ(W h + b − R h) at the first and
    last 3 tokens of the unpadded batch, under autocast to `dtype` if given."""
    assert params.config.intervention == "loreft" and params.config.positions == "f3+l3"

    def edit(leaves):
        def hook(module, args, h):
            R, W, b = leaves["R"], leaves["W"], leaves["b"]
            picked = torch.zeros(h.shape[1], dtype=torch.bool)
            picked[:3] = picked[-3:] = True
            return torch.where(picked[:, None], h + (h @ W.t() + b - h @ R.t()) @ R, h)

        return hook

    handles = [model.get_submodule(p).register_forward_hook(edit(params[p])) for p in params]
    try:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return out.logits.float(), flat(torch.autograd.grad(out.loss, leaves))


def assert_within_precision(name, dtype, logits, grads, model, params, batch, leaves):
    ref_logits, ref_grads = dense_reference(model, params, batch, leaves)
    low_logits, low_grads = dense_reference(model, params, batch, leaves, dtype)
    with torch.no_grad():
        base = model(**batch).logits
    # The adapter moves the logits far more than the precision lost: a test that ignored it would fail.
    assert relative(ref_logits, base) > 20 * FLOOR[dtype]
    for what, got, low, ref in (("logits", logits, low_logits, ref_logits), ("gradients", grads, low_grads, ref_grads)):
        bound = 2 * relative(low, ref) + FLOOR[dtype]
        error = relative(got, ref)
        assert error <= bound, f"{name} under {dtype} autocast: {what} off the float32 reference by {error:.4f}"


@pytest.mark.parametrize("name", VARIANTS)
def test_bf16_autocast_trains_as_the_dense_reference(name):
    """A bf16 AMP step: the output and every trainable leaf's gradient match the dense merge's within bf16
    precision; the leaves stay float32 and their gradients are float32."""
    model, batch, params = setup(name)
    leaves = [t for _, _, t in lf.split(params)[0].leaves()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lf.apply(model, params, batch)
    assert out.logits.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.loss, leaves)
    assert all(g.dtype == torch.float32 for g in grads)
    assert_within_precision(name, torch.bfloat16, out.logits, flat(grads), model, params, batch, leaves)


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_fp16_autocast_with_grad_scaler(name):
    """An fp16 AMP step with `GradScaler`, as the torch recipe writes it: scaled backward, unscale, step, update.
    The unscaled gradients match the dense reference within fp16 precision, and the step is taken."""
    model, batch, params = setup(name)
    leaves = [t for _, _, t in lf.split(params)[0].leaves()]
    before = [t.detach().clone() for t in leaves]
    optimizer = torch.optim.SGD(leaves, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with torch.autocast("cpu", dtype=torch.float16):
        out = lf.apply(model, params, batch)
    scaler.scale(out.loss).backward()
    scaler.unscale_(optimizer)
    grads = flat(t.grad for t in leaves)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**10  # no inf or NaN gradient: the step was not skipped
    for value, t in zip(before, leaves):
        torch.testing.assert_close(t.detach(), value - 1e-2 * t.grad)
    for t, value in zip(leaves, before):  # the reference at the values the gradients were taken at
        t.data.copy_(value)
    assert_within_precision(name, torch.float16, out.logits, grads, model, params, batch, leaves)


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_merge_and_init_ignore_an_enclosing_autocast(name):
    """`merge` inside an autocast block gives the same float32 weights as outside it (it used to fold in a bf16
    product); `init` builds the same leaves (for a calibrated variant, from the same calibration forward)."""
    model, batch, params = setup(name)
    has_weights = REGISTRY[name].capability(Intervention) is None  # ReFT: no weight form, merge refuses it
    merged = lf.merge(model, params) if has_weights else {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = lf.merge(model, params) if has_weights else {}
    assert merged.keys() == inside.keys()
    for key in merged:
        assert inside[key].dtype == merged[key].dtype, key
        assert torch.equal(inside[key], merged[key]), key
    if not REGISTRY[name].calibrated:
        fresh = lf.init(model, tiny_config(name, r=4), seed=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            again = lf.init(model, tiny_config(name, r=4), seed=0)
        for path, leaf, tensor in fresh.leaves():
            assert torch.equal(again[path][leaf], tensor), f"{path}.{leaf}"


def test_double_backward_under_autocast():
    """`create_graph=True` under autocast (a gradient penalty): the second derivative through LoRA's low-rank path
    matches the dense merge's within bf16 precision."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    x = torch.randn(6, 16)
    params = perturbed(lf.init(model, lf.LoRAConfig(r=4), seed=0), scale=0.3)
    leaves = [t for _, _, t in lf.split(params)[0].leaves()]

    def penalty(run, dtype=torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = run().float().pow(2).mean()
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        return flat(torch.autograd.grad(sum((g.float() ** 2).sum() for g in grads), leaves))

    got = penalty(lambda: lf.apply(model, params, x))
    dense = lambda: torch.func.functional_call(model, lf.merge(model, params), (x,))  # noqa: E731
    want, low = penalty(dense, None), penalty(dense)
    assert relative(got, want) <= 2 * relative(low, want) + FLOOR[torch.bfloat16]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["conv", "conv1d", "embedding"])
def test_lora_on_every_kind_trains_under_bf16_autocast(kind):
    """Convolutions (their own conv path), transformers' Conv1D and embeddings (the lookup path) under autocast:
    output and gradients within bf16 precision of the float32 dense merge. The bound is wider than the
    Qwen3 linear layers' (2x the dense reference's own error): PEFT's ops (F.linear(F.linear(x, A), B) under
    autocast) lose the same precision on these models (measured: 0.116 relative on GPT-2's gradients, as here)."""
    from components import cnn_batch, tiny_cnn, tiny_gpt2

    if kind == "conv":
        model, batch = tiny_cnn(), cnn_batch()
        cfg = lf.LoRAConfig(r=2, target_names=("^(stem|conv|down|dilated|pointwise)$",))  # `mix` is grouped
        run = lambda p: lf.apply(model, p, batch)  # noqa: E731
        dense = lambda merged: torch.func.functional_call(model, merged, (batch,))  # noqa: E731
        loss = lambda out: out.float().pow(2).mean()  # noqa: E731
        output = lambda out: out  # noqa: E731
    else:
        model = tiny_gpt2() if kind == "conv1d" else tiny_qwen3(num_hidden_layers=1)
        batch = qwen3_batch()
        names = {"target_names": ("embed_tokens",), "exclude_names": ()} if kind == "embedding" else {}
        cfg = lf.LoRAConfig(r=2, **names)
        run = lambda p: lf.apply(model, p, batch)  # noqa: E731
        dense = lambda merged: torch.func.functional_call(model, merged, (), batch)  # noqa: E731
        loss = lambda out: out.loss  # noqa: E731
        output = lambda out: out.logits  # noqa: E731
    params = perturbed(lf.init(model, cfg, seed=0), scale=0.1)
    assert {t.kind for t in params.targets} == {kind}
    leaves = [t for _, _, t in lf.split(params)[0].leaves()]
    ref = dense(lf.merge(model, params))
    ref_grads = flat(torch.autograd.grad(loss(ref), leaves))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(params)
    grads = flat(torch.autograd.grad(loss(out), leaves))
    with torch.no_grad():
        base = output(run(lf.init(model, cfg, seed=0)))
    assert relative(output(ref), base) > 0.05  # the adapter moves the output well past the tolerance below
    assert relative(output(out), output(ref)) < 0.03
    assert relative(grads, ref_grads) < 0.15


def test_per_example_grads_under_autocast():
    """torch.func's vmap(grad) through the low-rank path under bf16 autocast: within bf16 precision of float32."""
    import torch.nn.functional as F

    model, batch, params = setup("lora")
    inputs = {"input_ids": batch["input_ids"]}

    def token_loss(out):
        logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
        return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)

    want = lf.per_example_grads(model, params, inputs, token_loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lf.per_example_grads(model, params, inputs, token_loss)
    assert all(t.dtype == torch.float32 for _, _, t in got.leaves())
    assert relative(flat(t for _, _, t in got.leaves()), flat(t for _, _, t in want.leaves())) < 0.05
