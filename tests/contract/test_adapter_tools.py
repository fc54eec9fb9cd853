"""The tools a fine-tuning session needs: `lf.freeze` (part of an adapter stays put, in both training styles),
`lf.cast` (another dtype, saved and loaded), `lf.stack(..., pad=True)` (different ranks in one stack), and
per-row losses of a mixed batch."""

from __future__ import annotations

import optree
import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from components import perturbed, qwen3_batch, tiny_config, tiny_qwen3

import lora_func as lf
from lora_func._config import config_for
from lora_func.variants import REGISTRY

# SDPA on CPU has no vmap batching rule: torch warns that it loops over the vmapped dim (correct, slower).
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented")


def adapter(name: str, model, seed: int = 0, **fields) -> lf.Params:
    variant = REGISTRY[name]
    calibration = [qwen3_batch(batch=4, seed=7)] if variant.calibrated else None
    cfg = tiny_config(variant.name, **{"r": 4, **fields})
    return perturbed(lf.init(model, cfg, seed=seed, calibration_data=calibration), seed=20 + seed)


def names(params: lf.Params) -> set[tuple[str, str]]:
    return {(path, leaf) for path, leaf, _ in params.leaves()}


# -- freeze -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_freeze_agrees_in_both_training_styles_and_in_the_module(name):
    """Freezing the first two targets' trainable leaves: `split`, `trainable_leaves`, `torch.func.grad`,
    `AdapterModule.parameters()` and an optimizer step all leave them out, and they do not move."""
    model = tiny_qwen3()
    params = adapter(name, model)
    if len(params.targets) < 2:  # Trainable Tokens: the embedding alone; freezing it would leave nothing to train
        pytest.skip(f"{name} has one target here")
    chosen = [t.path for t in params.targets[: min(2, len(params.targets) - 1)]]
    pattern = "|".join(p.replace(".", r"\.") + "$" for p in chosen)
    frozen_params = lf.freeze(params, targets=pattern)
    expected = {(p, leaf) for p, leaf in names(lf.split(params)[0]) if p in chosen}  # their trainable leaves
    assert expected
    trainable, frozen = lf.split(frozen_params)
    assert names(trainable) == names(lf.split(params)[0]) - expected
    assert expected <= names(frozen)
    assert {id(t) for t in lf.trainable_leaves(frozen_params)} == {id(t) for _, _, t in trainable.leaves()}
    for path, leaf in expected:
        assert not frozen_params[path][leaf].requires_grad
        assert frozen_params[path][leaf].data_ptr() == params[path][leaf].data_ptr()

    batch = qwen3_batch()
    grads = torch.func.grad(lambda t: lf.apply(model, lf.combine(t, frozen), batch).loss)(trainable)
    assert names(grads) == names(trainable)
    module = lf.AdapterModule(model, frozen_params)
    assert len(list(module.parameters())) == len(lf.trainable_leaves(frozen_params))
    before = {(p, leaf): t.detach().clone() for p, leaf, t in module.params.leaves()}
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    module(**batch).loss.backward()
    optimizer.step()
    moved = {(p, leaf) for p, leaf, t in module.params.leaves() if not torch.equal(t, before[(p, leaf)])}
    assert moved == names(trainable)  # every trainable leaf moved, no frozen one did


def test_freeze_by_leaf_name_and_composition():
    model = tiny_qwen3()
    params = adapter("lora", model)
    only_b = lf.freeze(params, leaves="A")
    assert {leaf for _, leaf, _ in lf.split(only_b)[0].leaves()} == {"B"}
    both = lf.freeze(only_b, targets=r"layers\.0\.", leaves=["B"])
    trainable = lf.split(both)[0]
    assert all("layers.0." not in path for path, _, _ in trainable.leaves())
    assert len(list(trainable.leaves())) == len(params.targets) // 2


def test_the_frozen_set_rides_through_pytrees_stack_and_vmap():
    model = tiny_qwen3()
    params = lf.freeze(adapter("lora", model), leaves="A")
    for mapped in (pytree.tree_map(lambda t: t * 1, params), optree.tree_map(lambda t: t * 1, params)):
        assert mapped.frozen == params.frozen
    stacked = lf.stack([params, lf.freeze(adapter("lora", model, seed=1), leaves="A")])
    assert stacked.frozen == params.frozen
    assert {leaf for _, leaf, _ in lf.split(stacked)[0].leaves()} == {"B"}
    trainable, frozen = lf.split(stacked)
    batch = qwen3_batch()
    grads = torch.func.vmap(torch.func.grad(lambda t, f: lf.apply(model, lf.combine(t, f), batch).loss))(
        trainable, frozen
    )
    assert {leaf for _, leaf, _ in grads.leaves()} == {"B"}
    with pytest.raises(ValueError, match="other `lf.freeze` leaves"):
        lf.stack([params, adapter("lora", model, seed=1)])


def test_freeze_is_training_state_not_saved(tmp_path):
    model = tiny_qwen3()
    params = lf.freeze(adapter("lora", model), leaves="A")
    lf.save(params, tmp_path / "a.safetensors")
    loaded = lf.load(tmp_path / "a.safetensors", model)
    assert loaded.frozen == frozenset() and {leaf for _, leaf, _ in lf.split(loaded)[0].leaves()} == {"A", "B"}


def test_freeze_bad_input_names_the_argument():
    model = tiny_qwen3()
    params = adapter("pissa", model)
    with pytest.raises(ValueError, match="give `targets`"):
        lf.freeze(params)
    with pytest.raises(ValueError, match=r"`leaves` names 'C'; the adapter's leaves are \['A', 'A0', 'B', 'B0'\]"):
        lf.freeze(params, leaves="C")
    with pytest.raises(ValueError, match="`targets` .* match no module path"):
        lf.freeze(params, targets=r"encoder\.")
    with pytest.raises(ValueError, match="`targets` pattern '\\(' is not a regex"):
        lf.freeze(params, targets="(")
    with pytest.raises(ValueError, match="holds no trainable leaf"):
        lf.freeze(params, leaves=["A0", "B0"])  # PiSSA's own frozen copies
    with pytest.raises(TypeError, match="`leaves` must hold strings"):
        lf.freeze(params, leaves=[1])
    with pytest.raises(ValueError, match="different `lf.freeze` leaves"):
        lf.combine(lf.split(params)[0], lf.split(lf.freeze(params, leaves="A"))[1])


# -- cast -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_cast_saves_and_loads_in_the_new_dtype(name, tmp_path):
    model = tiny_qwen3()
    params = adapter(name, model)
    half = lf.cast(params, torch.bfloat16)
    assert half.config.dtype == torch.bfloat16 and {t.dtype for _, _, t in half.leaves()} == {torch.bfloat16}
    for (_, _, a), (_, _, b) in zip(half.leaves(), params.leaves()):
        assert a.requires_grad == b.requires_grad and a.is_leaf
        assert torch.equal(a, b.detach().to(torch.bfloat16))
    lf.save(half, tmp_path / "half.safetensors")
    loaded = lf.load(tmp_path / "half.safetensors", model)
    assert loaded.config == half.config and names(loaded) == names(half)
    for path, leaf, t in loaded.leaves():
        assert torch.equal(t, half[path][leaf])
    back = lf.cast(loaded, "float32")
    assert back.config == params.config
    # The bf16 adapter runs on the fp32 model as its fp32 image does, to bf16 rounding where a variant computes in
    # its leaves' dtype (most compute in the input's; HRA solves for its factors in float32).
    batch = qwen3_batch()
    with torch.no_grad():
        logits = lf.apply(model, half, batch).logits
        torch.testing.assert_close(logits, lf.apply(model, back, batch).logits, rtol=1e-2, atol=1e-2)


def test_cast_bad_dtype_and_same_dtype():
    params = adapter("lora", tiny_qwen3())
    with pytest.raises(ValueError, match="cast: `dtype` torch.int64 is not a floating dtype"):
        lf.cast(params, torch.int64)
    same = lf.cast(params, torch.float32)
    assert all(a is b for (_, _, a), (_, _, b) in zip(same.leaves(), params.leaves()))


# -- stacking different ranks ---------------------------------------------------------------------------


# The low-rank family, whose zero rows in A and columns in B change nothing: the docs promise that they pad.
PADDED = {"lora", "pissa", "dora", "eva"}


def test_the_documented_paddable_methods_are_registered():
    assert PADDED <= set(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_stack_pads_different_ranks_exactly_or_refuses_by_name(name):
    """Ranks 4 and 8 with different scales: each padded adapter's rows equal the unpadded adapter run alone, in a
    mixed batch and under vmap; variants outside the low-rank family are refused, naming the variant."""
    model = tiny_qwen3()
    adapters = [adapter(name, model, seed=0, r=4, alpha=3.0), adapter(name, model, seed=1, r=8, alpha=16.0)]
    if REGISTRY[name].calibrated and adapters[0].targets != adapters[1].targets:
        pytest.skip("calibration chose other targets for the two ranks")
    try:
        stacked = lf.stack(adapters, pad=True)
    except ValueError as refused:
        assert f"variant {name!r} with different ranks cannot be stacked" in str(refused)
        assert name not in PADDED  # the docs promise these
        return
    with pytest.raises(ValueError, match=r"differ in rank only: lf.stack\(adapters, pad=True\)"):
        lf.stack(adapters)
    largest = max(config_for(a.config, t.path).r for a in adapters for t in a.targets)  # EVA: its rank_pattern
    assert stacked.config.r == largest and lf.unstack(stacked)[0].config == stacked.config
    batch = qwen3_batch(batch=4)
    with torch.no_grad():
        alone = [lf.apply(model, a, batch).logits for a in adapters]
        mixed = lf.apply(model, stacked, batch, adapter_ids=torch.tensor([0, 1, 1, 0])).logits
        mapped = torch.func.vmap(lambda p: lf.apply(model, p, batch).logits)(stacked)
    for row, k in enumerate([0, 1, 1, 0]):
        torch.testing.assert_close(mixed[row], alone[k][row], rtol=1e-5, atol=1e-5)
    for k in range(2):
        torch.testing.assert_close(mapped[k], alone[k], rtol=1e-5, atol=1e-5)


def test_padded_stack_trains_as_each_adapter_alone_when_scales_agree():
    """alpha = 2r: no factor is rescaled, so the padded stack's gradient is each adapter's own, zero on the padding."""
    model = tiny_qwen3()
    adapters = [adapter("lora", model, seed=k, r=r, alpha=2.0 * r) for k, r in enumerate((2, 4))]
    stacked = lf.stack(adapters, pad=True)
    batch = qwen3_batch(batch=2)
    lf.apply(model, stacked, batch, adapter_ids=torch.tensor([0, 1])).loss.backward()
    for k, a in enumerate(adapters):
        row = {key: v[k : k + 1] for key, v in batch.items()}
        # The mixed batch's loss is the mean over both rows' tokens: each row counts half.
        (lf.apply(model, a, row).loss / 2).backward()
        for target in a.targets:
            r = a.config.r
            A, B = stacked[target.path]["A"], stacked[target.path]["B"]
            torch.testing.assert_close(A.grad[k, :r], a[target.path]["A"].grad, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(B.grad[k, :, :r], a[target.path]["B"].grad, rtol=1e-5, atol=1e-7)
            assert not A.grad[k, r:].any() and not B.grad[k, :, r:].any()


def test_stack_pad_needs_configs_that_differ_in_rank_only():
    model = tiny_qwen3()
    a = adapter("lora", model, r=2)
    b = adapter("lora", model, r=4, use_rslora=True)
    with pytest.raises(ValueError, match=r"`adapters\[1\]` has config"):
        lf.stack([a, b], pad=True)


# -- per-row losses of a mixed batch ----------------------------------------------------------------------


def test_per_row_losses_of_a_mixed_batch_equal_each_row_alone():
    """The README's recipe: token losses with reduction='none', averaged per row over the row's labelled tokens."""
    model = tiny_qwen3()
    adapters = [adapter("lora", model, seed=k) for k in range(2)]
    stacked = lf.stack(adapters)
    batch = qwen3_batch(batch=4)
    batch["labels"] = batch["labels"].clone()
    batch["labels"][1, :5] = -100  # rows with different numbers of labelled tokens
    ids = torch.tensor([0, 1, 1, 0])
    logits = lf.apply(model, stacked, batch, adapter_ids=ids).logits
    labels = batch["labels"][:, 1:]
    tokens = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none", ignore_index=-100)
    mask = labels != -100
    row_losses = (tokens * mask).sum(1) / mask.sum(1)
    for i, k in enumerate(ids.tolist()):
        row = {key: v[i : i + 1] for key, v in batch.items()}
        torch.testing.assert_close(row_losses[i], lf.apply(model, adapters[k], row).loss, rtol=1e-5, atol=1e-6)
