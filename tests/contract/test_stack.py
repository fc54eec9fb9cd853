"""K adapters at once: `lf.stack` / `lf.unstack`, and `torch.func.vmap` over the stack (fp32, float and 4-bit bases)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_untouched, perturbed, qwen3_batch, snapshot, tiny_qwen3, tiny_qwen3_4bit

import lora_func as lf

# SDPA on CPU has no vmap batching rule: torch warns that it loops over the vmapped dim (correct, slower).
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented")

K = 3


def k_adapters(model, cfg=None):
    cfg = cfg or lf.LoRAConfig(r=4)
    return [perturbed(lf.init(model, cfg, seed=s), seed=10 + s) for s in range(K)]


def test_stack_unstack_roundtrip():
    model = tiny_qwen3()
    adapters = k_adapters(model, lf.DeLoRAConfig(r=4))  # trainable and frozen leaves
    stacked = lf.stack(adapters)
    assert stacked.config == adapters[0].config and stacked.targets == adapters[0].targets
    for path, leaf, t in stacked.leaves():
        assert t.shape == (K, *adapters[0][path][leaf].shape)
        assert t.is_leaf and t.requires_grad == adapters[0][path][leaf].requires_grad, f"{path}.{leaf}"
        for k in range(K):
            assert torch.equal(t[k], adapters[k][path][leaf])
    back = lf.unstack(stacked)
    assert len(back) == K
    for k, p in enumerate(back):
        assert p.config == adapters[k].config and list(p) == list(adapters[k])
        for path, leaf, t in p.leaves():
            assert torch.equal(t, adapters[k][path][leaf])
            assert t.is_leaf and t.requires_grad == adapters[k][path][leaf].requires_grad
            assert t.untyped_storage().data_ptr() != stacked[path][leaf].untyped_storage().data_ptr()


def test_stack_refuses_mismatches():
    model = tiny_qwen3()
    a = lf.init(model, lf.LoRAConfig(r=4), seed=0)
    with pytest.raises(ValueError, match=r"`adapters` is empty"):
        lf.stack([])
    with pytest.raises(TypeError, match=r"`adapters\[1\]` must be lora_func Params"):
        lf.stack([a, {"x": 1}])
    with pytest.raises(TypeError, match="single Params"):
        lf.stack(a)
    with pytest.raises(ValueError, match=r"`adapters\[1\]` has config"):
        lf.stack([a, lf.init(model, lf.LoRAConfig(r=2), seed=0)])
    with pytest.raises(ValueError, match=r"`adapters\[1\]` has config"):
        lf.stack([a, lf.init(model, lf.DeLoRAConfig(r=4), seed=0)])
    other = lf.init(model, lf.LoRAConfig(r=4, target_names=(r"q_proj$",)), seed=0)
    with pytest.raises(ValueError, match=r"`adapters\[1\]` has config"):
        lf.stack([a, other])
    moved_target = dataclasses.replace(a.targets[0], path="model.layers.0.self_attn.k_proj")
    renamed = lf.Params({moved_target.path: a[a.targets[0].path]}, a.config, (moved_target,))
    with pytest.raises(ValueError, match=r"`adapters\[1\]` has other targets.*k_proj"):
        lf.stack([lf.Params({a.targets[0].path: a[a.targets[0].path]}, a.config, a.targets[:1]), renamed])
    half = lf.split(a)[0]
    wrong_dtype = a.replace({p: {k: v.double() for k, v in e.items()} for p, e in a.items()})
    with pytest.raises(ValueError, match=r"`adapters\[1\]` leaf model\.layers\.0\.self_attn\.q_proj\.A is .*float64"):
        lf.stack([a, wrong_dtype])
    delora = lf.init(model, lf.DeLoRAConfig(r=4), seed=0)
    with pytest.raises(ValueError, match=r"`adapters\[1\]` has other leaves"):
        lf.stack([delora, lf.split(delora)[0]])
    assert lf.stack([half, half])[a.targets[0].path]["A"].shape == (2, 4, 64)  # trainable halves stack


def test_unstack_and_apply_detect_stacking_by_leaf_shape(tmp_path):
    model = tiny_qwen3()
    a = lf.init(model, lf.LoRAConfig(r=4), seed=0)
    with pytest.raises(ValueError, match="not stacked"):
        lf.unstack(a)
    stacked = lf.stack(k_adapters(model))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"`params` stacks 3 adapters.*torch\.func\.vmap.*`adapter_ids`"):
        lf.apply(model, stacked, qwen3_batch())
    with pytest.raises(ValueError, match=r"`adapter_ids` picks among stacked adapters"):
        lf.apply(model, a, qwen3_batch(), adapter_ids=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"merge: `params` stacks 3 adapters; merge each of lf\.unstack"):
        lf.merge(model, stacked)
    with pytest.raises(ValueError, match=r"save: `params` stacks 3 adapters; save each of lf\.unstack"):
        lf.save(stacked, tmp_path / "stacked.safetensors")
    assert not (tmp_path / "stacked.safetensors").exists()
    assert_untouched(model, before)

    path = a.targets[0].path
    ragged = {p: dict(e) for p, e in stacked.items()}
    ragged[path]["A"] = a[path]["A"]  # one leaf unstacked, the rest stacked
    with pytest.raises(ValueError, match=r"disagree on the stack size"):
        lf.apply(model, stacked.replace(ragged), qwen3_batch())
    bad = {p: dict(e) for p, e in a.items()}
    bad[path]["B"] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match=rf"leaf {path}\.B has shape \(5, 5\); its variant declares \(64, 4\)"):
        lf.apply(model, a.replace(bad), qwen3_batch())
    assert_untouched(model, before)


@pytest.mark.parametrize("build", [tiny_qwen3, tiny_qwen3_4bit], ids=["qwen3", "qwen3-4bit"])
def test_vmap_over_stack_equals_separate_runs(build):
    """Outputs and `vmap(grad)` gradients (over the trainable half) equal K separate runs."""
    model = build()
    batch = qwen3_batch()
    adapters = k_adapters(model, lf.DeLoRAConfig(r=4))  # a frozen leaf: stacked and combined under vmap
    stacked = lf.stack(adapters)
    before = snapshot(model)

    logits = torch.func.vmap(lambda p: lf.apply(model, p, batch).logits)(stacked)
    expected = torch.stack([lf.apply(model, p, batch).logits for p in adapters]).detach()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)

    trainable, frozen = lf.split(stacked)  # both halves stacked: vmap maps over both

    def loss(t, f):
        return lf.apply(model, lf.combine(t, f), batch).loss

    grads, losses = torch.func.vmap(torch.func.grad_and_value(loss))(trainable, frozen)
    with pytest.raises(ValueError, match=r"disagree on the stack size.*vmap over both halves"):
        torch.func.vmap(lambda t: loss(t, frozen))(trainable)  # the frozen half left stacked inside
    for k, p in enumerate(adapters):
        loss = lf.apply(model, p, batch).loss
        loss.backward()
        torch.testing.assert_close(losses[k], loss.detach(), rtol=1e-6, atol=1e-6)
        for path, leaf, t in lf.split(p)[0].leaves():
            torch.testing.assert_close(grads[path][leaf][k], t.grad, rtol=1e-5, atol=1e-6, msg=f"{k} {path}.{leaf}")
    assert_untouched(model, before)


def test_k_adapters_on_a_repeated_batch_equal_vmap():
    """The other way to run K adapters in one pass: the batch repeated K times, block k using adapter k."""
    model = tiny_qwen3()
    batch = qwen3_batch()
    stacked = lf.stack(k_adapters(model))
    rows = batch["input_ids"].shape[0]
    repeated = {name: t.repeat(K, 1) for name, t in batch.items()}
    ids = torch.arange(K).repeat_interleave(rows)
    (lf.apply(model, stacked, repeated, adapter_ids=ids).loss * K).backward()  # HF's loss: the mean over K blocks
    expected = torch.func.vmap(torch.func.grad(lambda p: lf.apply(model, p, batch).loss))(lf.split(stacked)[0])
    for path, leaf, t in lf.split(stacked)[0].leaves():
        torch.testing.assert_close(t.grad, expected[path][leaf], rtol=1e-5, atol=1e-6, msg=f"{path}.{leaf}")


def test_vmap_trains_k_learning_rates_at_once():
    """K adapters, one `vmap(grad)` per step, each with its own learning rate: equal to K separate loops."""
    model = tiny_qwen3()
    batch = qwen3_batch()
    adapters = k_adapters(model)
    lrs = torch.tensor([1e-3, 1e-2, 5e-2])

    def loss_of(t):
        return lf.apply(model, t, batch).loss

    stacked = lf.split(lf.stack(adapters))[0]
    for _ in range(3):
        grads = torch.func.vmap(torch.func.grad(loss_of))(stacked)
        stacked = stacked.replace(
            {
                p: {k: v - lrs.view(-1, *[1] * (v.dim() - 1)) * grads[p][k] for k, v in e.items()}
                for p, e in stacked.items()
            }
        )
    for k, p in enumerate(adapters):
        t = lf.split(p)[0]
        for _ in range(3):
            g = torch.func.grad(loss_of)(t)
            t = t.replace({path: {n: v - lrs[k] * g[path][n] for n, v in e.items()} for path, e in t.items()})
        for path, leaf, v in t.leaves():
            torch.testing.assert_close(stacked[path][leaf][k], v, rtol=1e-5, atol=1e-6, msg=f"{k} {path}.{leaf}")


def test_quantized_base_runs_once_per_layer_under_vmap(monkeypatch):
    """bnb kernels have no vmap rule: `QuantizedLinear.vmap` folds the K adapters into the rows of one call."""
    import bitsandbytes as bnb

    model = tiny_qwen3_4bit()
    batch = qwen3_batch()
    stacked = lf.stack(k_adapters(model))
    calls = []
    original = bnb.nn.Linear4bit.forward

    def counting(self, x):
        calls.append(tuple(x.shape))
        return original(self, x)

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", counting)
    torch.func.vmap(lambda p: lf.apply(model, p, batch).logits)(stacked)
    layers = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert len(calls) == layers, f"{len(calls)} bnb calls for {layers} layers"
    # Layer 0's q/k/v read the embeddings, the same for all K adapters: vmap calls them unbatched, once.
    # Every later layer's input differs per adapter and arrives as one (K * batch * seq, d_in) matrix.
    rows = K * batch["input_ids"].numel()
    assert calls[:3] == [(*batch["input_ids"].shape, 64)] * 3
    assert all(len(shape) == 2 and shape[0] == rows for shape in calls[3:]), calls
