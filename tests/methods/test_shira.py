"""SHiRA against its formula (ΔW holds the values at the entries of PEFT's `random_mask`, in row-major order, zeros
elsewhere) and against PEFT's SHiRA given the same leaves: outputs, gradients, and files both ways; a 4-bit base."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from components import Calls, qwen3_batch, tiny_qwen3
from peft_parity import (
    PROJECTIONS,
    assert_peft_files_round_trip,
    assert_same_as_peft,
    identity_then_deltas,
    peft_leaf,
    peft_twin,
    randomized,
    twins,
)

import lora_func as lf

peft = pytest.importorskip("peft")
from peft.tuners.shira.mask_functions import random_mask  # noqa: E402

# PEFT builds ΔW as a sparse COO tensor, and torch warns that its invariant checks are off.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled:UserWarning")

CASES = {"default seed": {"r": 2}, "seed 7": {"r": 3, "random_seed": 7}}


def _draw(path, leaf, tensor, gen):
    return 0.1 * torch.randn(tensor.shape, generator=gen)


@pytest.mark.parametrize("case", list(CASES))
def test_dense_formula_and_identity_at_init(case):
    cfg = lf.SHiRAConfig(**CASES[case], target_names=("q_proj", "down_proj"))
    for module, leaves, dw in identity_then_deltas(tiny_qwen3().eval(), cfg):
        mask = random_mask(module, cfg.r, random_seed=cfg.random_seed)
        want = torch.zeros_like(module.weight)
        want[mask] = leaves["shira_weight"]  # row-major, as torch.where lists the mask's entries
        assert int(mask.sum()) == cfg.r * (module.in_features + module.out_features)
        assert torch.equal(dw, want)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft_outputs_and_gradients(case):
    model, params, peft_model = peft_twin(
        lf.SHiRAConfig(**CASES[case], target_names=PROJECTIONS),
        peft.ShiraConfig(**CASES[case], target_modules=list(PROJECTIONS)),
        _draw,
    )
    assert_same_as_peft(model, params, peft_model, peft_leaf)


def test_matches_peft_on_a_4bit_base():
    """PEFT's SHiRA wraps bitsandbytes' Linear4bit: the same base, the same leaves, the same step."""
    model, twin = twins(bits=4)
    model, params, peft_model = peft_twin(
        lf.SHiRAConfig(r=2, target_names=PROJECTIONS),
        peft.ShiraConfig(r=2, target_modules=list(PROJECTIONS)),
        _draw,
        model=model,
        twin=twin,
    )
    assert_same_as_peft(model, params, peft_model, peft_leaf)


@pytest.mark.parametrize("case", list(CASES))
def test_from_peft_gives_peft_logits_and_to_peft_loads_in_peft(case, tmp_path):
    cfg = peft.ShiraConfig(**CASES[case], target_modules=["q_proj", "v_proj", "down_proj"])
    params = assert_peft_files_round_trip(tmp_path, cfg, "shira_weight", 0.1)
    assert (params.config.r, params.config.random_seed) == (cfg.r, cfg.random_seed)


def test_a_mask_lora_func_does_not_compute_is_refused(tmp_path):
    """A file whose `shira_indices` are not the random mask of its `random_seed` (a custom `mask_fn`)."""
    peft.get_peft_model(tiny_qwen3(), peft.ShiraConfig(r=2, random_seed=3, target_modules=["q_proj"])).save_pretrained(
        tmp_path
    )
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "random_seed": 4}))
    with pytest.raises(lf.AdapterFileError, match="shira_indices' is not what lora_func's shira computes"):
        lf.from_peft(tmp_path, tiny_qwen3())


def test_bad_fields_are_refused_by_name():
    with pytest.raises(ValueError, match="`mask_type` must be 'random'"):
        lf.SHiRAConfig(mask_type="custom")
    with pytest.raises(ValueError, match="`r`=40 gives 5120 entries, more than the 4096"):
        lf.init(tiny_qwen3(), lf.SHiRAConfig(r=40, target_names=("q_proj",)))


def test_a_call_of_one_adapter_runs_each_target_once_as_peft():
    """On float nn.Linear targets the layer runs once, on W + ΔW (the parameter form), not the base layer and then
    x (W + ΔW)ᵀ + b again; mixed batches run at the output, and both give the same rows."""
    model = tiny_qwen3()
    params = lf.init(model, lf.SHiRAConfig(r=2, target_names=PROJECTIONS), seed=0)
    params = randomized(params, _draw)
    batch = qwen3_batch()
    with Calls(F.linear) as base_calls:
        model(**batch)
    with Calls(F.linear) as calls:
        logits = lf.apply(model, params, batch).logits
    assert calls.count == base_calls.count == 7 * 2 + 1  # the projections of 2 layers, the head: once each
    logits.sum().backward()
    stacked = lf.stack([params, params])
    with Calls(F.linear) as mixed_calls:
        rows = lf.apply(model, stacked, batch, adapter_ids=[0] * len(batch["input_ids"])).logits
    assert mixed_calls.count == base_calls.count + 7 * 2  # the output form: each target computed again
    torch.testing.assert_close(rows, logits, rtol=0, atol=1e-5)
