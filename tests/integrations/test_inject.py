"""`lf.inject`: an adapter for a block of code — `model.generate` with an adapter, K adapters served in one
batch, and the block's bounds (outside it, and in other threads, the base model)."""

from __future__ import annotations

import threading

import pytest
import torch
from components import tiny_config
from conftest import assert_untouched, perturbed, qwen3_batch, snapshot, tiny_qwen3, tiny_qwen3_4bit

import lora_func as lf
from lora_func._variant import Intervention
from lora_func.variants import REGISTRY

VARIANTS = sorted(REGISTRY)
NEW_TOKENS = 5


def make(name: str, model, seed: int = 0, scale: float = 0.3) -> lf.Params:
    variant = REGISTRY[name]
    calibration = [qwen3_batch(seed=7)] if variant.calibrated else None
    params = lf.init(model, tiny_config(variant.name, r=4), seed=seed, calibration_data=calibration)
    return perturbed(params, scale=scale, seed=seed + 3)


def prompts(rows: int = 3, seed: int = 11) -> torch.Tensor:
    return qwen3_batch(batch=rows, seq=5, seed=seed)["input_ids"]


def greedy_by_recomputation(model, params, ids: torch.Tensor, adapter_ids=None) -> torch.Tensor:
    """Greedy decoding that re-runs the whole sequence with `lf.apply` for every token (no KV cache)."""
    for _ in range(NEW_TOKENS):
        logits = lf.apply(model, params, {"input_ids": ids}, adapter_ids=adapter_ids).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def generate(model, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)


@torch.no_grad()
def test_generate_inside_the_block_equals_greedy_recomputation_and_the_base_after_it():
    model = tiny_qwen3().eval()
    params = make("lora", model)
    ids = prompts()
    before = snapshot(model)
    base = generate(model, ids)
    with lf.inject(model, params):
        got = generate(model, ids)
        twice = generate(model, ids)  # any number of forwards inside the block
    assert torch.equal(got, greedy_by_recomputation(model, params, ids))
    assert torch.equal(twice, got)
    assert not torch.equal(got, base)  # the adapter changes the generation
    assert torch.equal(generate(model, ids), base)  # after the block: the base model
    assert_untouched(model, before)


@torch.no_grad()
@pytest.mark.parametrize("name", VARIANTS)
def test_mixed_adapter_generate_gives_each_row_its_own_adapter(name):
    """K adapters in one batch: each row generates what it generates alone with its adapter (-1: the base)."""
    model = tiny_qwen3().eval()
    adapters = [make(name, model, seed=s) for s in range(2)]
    ids = prompts(rows=4)
    adapter_ids = [1, -1, 0, 1]
    before = snapshot(model)
    with lf.inject(model, lf.stack(adapters), adapter_ids=adapter_ids):
        got = generate(model, ids)
    for row, a in enumerate(adapter_ids):
        alone = ids[row : row + 1]
        if a < 0:
            want = generate(model, alone)
        else:
            with lf.inject(model, adapters[a]):
                want = generate(model, alone)
        assert torch.equal(got[row : row + 1], want), f"row {row} (adapter {a})"
    assert_untouched(model, before)


@torch.no_grad()
@pytest.mark.parametrize("name", VARIANTS)
def test_mixed_batch_in_inference_gives_each_row_its_adapter_and_base_rows_exactly(name):
    """Eval mode without grad, where LoRA batches the rows itself (`Variant.inference`) and others vmap."""
    model = tiny_qwen3().eval()
    adapters = [make(name, model, seed=s) for s in range(3)]
    batch = qwen3_batch(batch=5, seq=7)
    ids = [2, -1, 0, 2, 1]
    got = lf.apply(model, lf.stack(adapters), batch, adapter_ids=ids).logits
    base = model(**batch).logits
    for row, a in enumerate(ids):
        alone = {k: v[row : row + 1] for k, v in batch.items()}
        if a < 0:
            assert torch.equal(got[row], base[row]), "a -1 row must be exactly the base model"
        else:
            want = lf.apply(model, adapters[a], alone).logits[0]
            torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_eval_mode_without_grad_equals_the_merged_model_and_the_grad_path(name):
    """Decoding's path (an eval-mode model, grad off: LoRA's and EVA's `Variant.inference`, one adapter and a
    mixed batch) against the dense merged weights and against the same call with grad on."""
    model = tiny_qwen3().eval()
    adapters = [make(name, model, seed=s) for s in range(2)]
    batch = qwen3_batch(batch=2, seq=6)
    with torch.enable_grad(), lf.inject(model, adapters[0]):
        with_grad = model(**batch).logits
    with torch.no_grad():
        with lf.inject(model, adapters[0]):
            got = model(**batch).logits
        merged = (  # ReFT has no weight form: the grad path is the reference
            with_grad
            if REGISTRY[name].capability(Intervention) is not None
            else torch.func.functional_call(model, lf.merge(model, adapters[0]), args=(), kwargs=batch).logits
        )
        with lf.inject(model, lf.stack(adapters), adapter_ids=[0, 0]):
            rows = model(**batch).logits
    torch.testing.assert_close(got, with_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, merged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rows, got, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, model(**batch).logits, atol=1e-3)  # the adapter acts


@torch.no_grad()
def test_mixed_adapter_generate_on_a_4bit_base():
    model = tiny_qwen3_4bit().eval()
    adapters = [make("lora", model, seed=s, scale=0.5) for s in range(3)]
    ids = prompts(rows=3)
    with lf.inject(model, lf.stack(adapters), adapter_ids=[2, 0, 1]):
        got = generate(model, ids)
    for row, a in enumerate([2, 0, 1]):
        assert torch.equal(got[row : row + 1], greedy_by_recomputation(model, adapters[a], ids[row : row + 1]))


def test_apply_is_the_block_around_one_call():
    model = tiny_qwen3()
    params = make("dora", model)
    batch = qwen3_batch()
    with lf.inject(model, params):
        inside = model(**batch).logits
    torch.testing.assert_close(lf.apply(model, params, batch).logits, inside, rtol=0, atol=0)


def test_nested_blocks_on_one_model_are_refused_and_lose_nothing():
    model = tiny_qwen3()
    p1, p2 = make("lora", model, seed=0), make("lora", model, seed=1)
    batch = qwen3_batch()
    before = snapshot(model)
    with lf.inject(model, p1):
        with pytest.raises(RuntimeError, match=r"inject: this thread already runs Qwen3ForCausalLM with an adapter"):
            with lf.inject(model, p2):
                pass
        with pytest.raises(RuntimeError, match="apply: this thread already runs"):
            lf.apply(model, p2, batch)
        inside = model(**batch).logits  # the first block still holds
    torch.testing.assert_close(inside, lf.apply(model, p1, batch).logits, rtol=0, atol=0)
    assert_untouched(model, before)


def test_a_block_entered_twice_or_left_in_another_thread_is_an_error():
    model = tiny_qwen3()
    before = snapshot(model)
    block = lf.inject(model, make("lora", model))
    with block:
        pass
    with pytest.raises(RuntimeError, match="already entered"):
        with block:
            pass
    other = lf.inject(model, make("lora", model))
    other.__enter__()
    errors = []
    worker = threading.Thread(target=lambda: errors.append(_exit_error(other)))
    worker.start()
    worker.join()
    assert "must exit in the thread that entered it" in errors[0]
    other.__exit__(None, None, None)
    assert_untouched(model, before)  # no dispatcher left on any module


def _exit_error(block) -> str:
    try:
        block.__exit__(None, None, None)
    except RuntimeError as e:
        return str(e)
    return ""


def test_errors_inside_the_block_leave_nothing_behind():
    model = tiny_qwen3()
    before = snapshot(model)
    with pytest.raises(ZeroDivisionError):
        with lf.inject(model, make("lora", model)):
            model(**qwen3_batch())
            raise ZeroDivisionError
    with pytest.raises(ValueError, match="adapter_ids"):
        lf.apply(model, lf.stack([make("lora", model)] * 2), qwen3_batch(batch=2), adapter_ids=[0, 1, 1])
    assert_untouched(model, before)
