"""Mixed-adapter batches, `lf.apply(model, stacked, batch, adapter_ids=ids)`, for every registered variant."""

from __future__ import annotations

import warnings

import pytest
import torch
from components import tiny_config
from conftest import assert_untouched, perturbed, qwen3_batch, snapshot, tiny_qwen3, tiny_qwen3_4bit

import lora_func as lf
from lora_func.variants import REGISTRY

VARIANTS = sorted(REGISTRY)
K = 3
# How `AdapterRows` runs them (see lora_func/_mixed.py):
ID_PATTERNS = {
    "scattered": [2, -1, 0, 2],  # vmapped: gathered, padded, a base row, adapter 1 unused
    "in-order": [0, 1, 2],  # vmapped over a view of the rows, no copies
    "one-adapter": [1, -1, 1, 1],  # looped: one adapter and base rows, permuted
    "skewed": [0, 0, 0, 0, 0, 1, 2],  # looped: padding would more than double the rows; contiguous slices
}


def assert_grad_close(got, expected, msg):
    """fp32 tolerance relative to the gradient's scale (a summed loss gives gradients of order 10-100)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * scale, msg=msg)


def calibration(variant):
    return [qwen3_batch(seed=7)] if variant.calibrated else None


def k_adapters(name, model):
    variant = REGISTRY[name]
    cfg = tiny_config(variant.name, r=4)
    return [
        perturbed(lf.init(model, cfg, seed=s, calibration_data=calibration(variant)), seed=20 + s) for s in range(K)
    ]


def row_outputs(model, adapters, batch, ids):
    """The reference: each row alone, with its own adapter (or the base model for -1)."""
    rows = []
    for i, a in enumerate(ids):
        row = {"input_ids": batch["input_ids"][i : i + 1]}
        out = model(**row) if a < 0 else lf.apply(model, adapters[a], row)
        rows.append(out.logits)
    return torch.cat(rows)


# Every variant through both ways of running groups; LoRA through every layout.
CASES = [(name, pattern) for name in VARIANTS for pattern in ("scattered", "one-adapter")]
CASES += [("lora", pattern) for pattern in sorted(ID_PATTERNS) if pattern not in ("scattered", "one-adapter")]


@pytest.mark.parametrize("name, pattern", CASES)
def test_mixed_batch_equals_rows_run_alone(name, pattern):
    """Inference and training: each row as if run with its own adapter; gradients only to the adapters used."""
    ids = ID_PATTERNS[pattern]
    model = tiny_qwen3()
    batch = {"input_ids": qwen3_batch(batch=len(ids))["input_ids"]}
    adapters = k_adapters(name, model)
    stacked = lf.stack(adapters)
    before = snapshot(model)

    with torch.no_grad():
        expected = row_outputs(model, adapters, batch, ids)
        got = lf.apply(model, stacked, batch, adapter_ids=torch.tensor(ids)).logits
        base = model(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for i, a in enumerate(ids):
        if a < 0:
            assert torch.equal(got[i], base[i]), "a -1 row must be exactly the base model"
    assert_untouched(model, before)

    # Training: a row-separable loss, so each adapter's reference gradient is the sum over its own rows.
    probe = torch.randn(got.shape, generator=torch.Generator().manual_seed(0))
    out = lf.apply(model, stacked, batch, adapter_ids=ids).logits  # a list of ints works as well
    (out * probe).sum().backward()
    assert_untouched(model, before)
    (row_outputs(model, adapters, batch, ids) * probe).sum().backward()
    for path, leaf, t in lf.split(stacked)[0].leaves():
        for k, adapter in enumerate(adapters):
            if k in ids:
                reference = adapter[path][leaf].grad
                assert_grad_close(t.grad[k], reference, f"{k} {path}.{leaf}")
            else:
                assert torch.equal(t.grad[k], torch.zeros_like(t.grad[k])), f"unused adapter {k} got a gradient"
    for _, leaf, t in lf.split(stacked)[1].leaves():
        assert t.grad is None, f"frozen leaf {leaf} got a gradient"


def test_mixed_batch_on_4bit_base_and_with_func_grad():
    """A quantized base, and `torch.func.grad` through `adapter_ids` equal to autograd."""
    model = tiny_qwen3_4bit()
    ids = [1, -1, 0, 1]
    batch = {"input_ids": qwen3_batch(batch=len(ids))["input_ids"]}
    adapters = k_adapters("lora", model)
    stacked = lf.stack(adapters)
    with torch.no_grad():
        got = lf.apply(model, stacked, batch, adapter_ids=torch.tensor(ids)).logits
        expected = row_outputs(model, adapters, batch, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    probe = torch.randn(got.shape, generator=torch.Generator().manual_seed(0))
    trainable, frozen = lf.split(stacked)

    def loss(t):
        return (lf.apply(model, lf.combine(t, frozen), batch, adapter_ids=torch.tensor(ids)).logits * probe).sum()

    func = torch.func.grad(loss)(trainable)
    loss(trainable).backward()
    for path, leaf, t in trainable.leaves():
        assert_grad_close(func[path][leaf], t.grad, f"{path}.{leaf}")
    assert torch.equal(func[path][leaf][2], torch.zeros_like(func[path][leaf][2]))


def test_mixed_batch_under_gradient_checkpointing():
    """The recompute in backward routes rows the same way: gradients equal those without checkpointing."""
    model = tiny_qwen3()
    ids = [2, 0, -1, 2]
    batch = qwen3_batch(batch=len(ids))
    stacked = lf.stack(k_adapters("lora", model))
    lf.apply(model, stacked, batch, adapter_ids=ids).loss.backward()
    reference = {(p, k): t.grad.clone() for p, k, t in stacked.leaves() if t.grad is not None}
    for _, _, t in stacked.leaves():
        t.grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    before = snapshot(model)
    lf.apply(model, stacked, batch, adapter_ids=ids).loss.backward()
    assert_untouched(model, before)
    for (p, k), g in reference.items():
        assert_grad_close(stacked[p][k].grad, g, f"{p}.{k}")


def test_adapter_ids_bad_input_names_the_argument():
    model = tiny_qwen3()
    batch = {"input_ids": qwen3_batch(batch=4)["input_ids"]}
    stacked = lf.stack(k_adapters("lora", model))
    before = snapshot(model)
    cases = [
        (torch.tensor([0, 1, 3, 0]), ValueError, r"`adapter_ids` has 3 at row 2; `params` stacks 3 adapters"),
        (torch.tensor([0, -2, 1, 0]), ValueError, r"`adapter_ids` has -2 at row 1"),
        (torch.tensor([0, 1, 2]), ValueError, r"`adapter_ids` has 3 entries, but .* got an input with 4 rows"),
        (torch.tensor([0, 1, 2, 0, 1]), ValueError, r"`adapter_ids` has 5 entries"),
        (torch.tensor([[0, 1], [2, 0]]), ValueError, r"`adapter_ids` must be 1-D"),
        (torch.tensor([0.0, 1.0, 2.0, 0.0]), TypeError, r"`adapter_ids` must hold integers"),
        (torch.tensor([True, False, True, True]), TypeError, r"`adapter_ids` must hold integers"),
        ([0, 1.5, 2, 0], TypeError, r"`adapter_ids` must hold ints, got 1\.5 at row 1"),
        ([0, True, 2, 0], TypeError, r"`adapter_ids` must hold ints, got True at row 1"),
        ("0120", TypeError, r"`adapter_ids` must be a 1-D integer tensor or a sequence of ints"),
        (torch.tensor([], dtype=torch.long), ValueError, r"`adapter_ids` is empty"),
    ]
    for ids, error, message in cases:
        with pytest.raises(error, match=message):
            lf.apply(model, stacked, batch, adapter_ids=ids)
        assert_untouched(model, before)


def test_mixed_batch_keeps_no_per_row_copy_of_the_leaves():
    """Memory: what autograd saves for a mixed batch is about what a single-adapter batch saves.

    With big leaves and short rows (r=32, 2 tokens), gathering each row's leaves would save
    rows x adapter size; grouping rows by adapter saves each adapter's leaves once (as views).
    """
    model = tiny_qwen3()
    cfg = lf.LoRAConfig(r=32)
    rows = 32
    batch = {"input_ids": qwen3_batch(batch=rows, seq=2)["input_ids"]}
    stacked = lf.stack([perturbed(lf.init(model, cfg, seed=s), seed=s) for s in range(2)])
    single = lf.unstack(stacked)[0]
    adapter_bytes = sum(t.numel() * t.element_size() for _, _, t in single.leaves())

    def saved_bytes(run) -> int:
        storages = {}

        def pack(t):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run().logits.sum().backward()
        return sum(storages.values())

    one = saved_bytes(lambda: lf.apply(model, single, batch))
    ids = torch.arange(rows) % 2  # alternating: the permuting path
    mixed = saved_bytes(lambda: lf.apply(model, stacked, batch, adapter_ids=ids))
    assert mixed - one <= adapter_bytes + one // 2, (one, mixed, adapter_bytes)
    assert rows * adapter_bytes > 4 * mixed  # what per-row gathering would have cost, for scale
