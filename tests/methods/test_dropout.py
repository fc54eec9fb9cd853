"""Adapter dropout on the low-rank family: PEFT's `lora_dropout` semantics (the adapter's input, training mode
only), against the dense reference and PEFT, and independent masks per adapter under vmap and mixed batches."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from components import cnn_batch, perturbed, qwen3_batch, tiny_cnn, tiny_qwen3
from peft_parity import ALL_PROJECTIONS, PROJECTIONS
from torch import nn

import lora_func as lf

P = 0.3


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).train()


def _x(rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, 8, generator=torch.Generator().manual_seed(1))


def test_dropout_drops_the_adapter_input_in_training_mode_only():
    model = mlp()
    params = perturbed(lf.init(model, lf.LoRAConfig(r=2, alpha=4, dropout=P), seed=0), scale=0.3)
    plain = lf.Params(dict(params.items()), lf.LoRAConfig(r=2, alpha=4), params.targets)
    x = _x()
    (A0, B0), (A2, B2) = (params["0"]["A"], params["0"]["B"]), (params["2"]["A"], params["2"]["B"])
    torch.manual_seed(7)
    y = model[0](x) + 2 * F.dropout(x, P) @ A0.t() @ B0.t()  # s = alpha / r = 2, dropout on each layer's input
    h = model[1](y)
    expected = model[2](h) + 2 * F.dropout(h, P) @ A2.t() @ B2.t()
    torch.manual_seed(7)
    out = lf.apply(model, params, x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, lf.apply(model, plain, x))  # the masks do act
    model.eval()  # eval mode: no dropout, no random draw
    state = torch.get_rng_state()
    torch.testing.assert_close(lf.apply(model, params, x), lf.apply(model, plain, x), rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), state)


def _peft_twin(model, **fields):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(model), LoraConfig(**fields))


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_matches_peft_lora_dropout(dora):
    model = tiny_qwen3()
    config = lf.DoRAConfig if dora else lf.LoRAConfig
    params = perturbed(lf.init(model, config(r=4, alpha=8, dropout=P, target_names=ALL_PROJECTIONS), seed=0), 0.1)
    peft_model = _peft_twin(model, r=4, lora_alpha=8, lora_dropout=P, use_dora=dora, target_modules=list(PROJECTIONS))
    names = {
        "A": "lora_A.default.weight",
        "B": "lora_B.default.weight",
        "magnitude": "lora_magnitude_vector.default.weight",
    }
    base = peft_model.get_base_model()
    with torch.no_grad():
        for path, leaf, tensor in lf.split(params)[0].leaves():
            base.get_submodule(path).get_parameter(names[leaf]).copy_(tensor)
    batch = qwen3_batch()
    torch.manual_seed(3)
    out = lf.apply(model, params, batch)
    torch.manual_seed(3)
    ref = peft_model(**batch)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for path, leaf, tensor in lf.split(params)[0].leaves():
        expected = base.get_submodule(path).get_parameter(names[leaf]).grad
        torch.testing.assert_close(tensor.grad, expected, rtol=1e-4, atol=1e-6, msg=f"{path}.{leaf}")


def test_conv_dropout_matches_peft():
    model = tiny_cnn()
    targets = ["stem", "down", "pointwise"]
    params = perturbed(lf.init(model, lf.LoRAConfig(r=4, alpha=8, dropout=P, target_names=tuple(targets)), seed=0))
    peft_model = _peft_twin(model, r=4, lora_alpha=8, lora_dropout=P, target_modules=targets)
    with torch.no_grad():
        for path, leaf, tensor in params.leaves():
            peft_model.get_base_model().get_submodule(path).get_parameter(f"lora_{leaf}.default.weight").copy_(tensor)
    torch.manual_seed(3)
    out = lf.apply(model, params, cnn_batch())
    torch.manual_seed(3)
    torch.testing.assert_close(out, peft_model(cnn_batch()), rtol=0, atol=1e-5)


def test_vmap_needs_randomness_and_then_draws_a_mask_per_adapter():
    model = mlp()
    params = perturbed(lf.init(model, lf.LoRAConfig(r=2, dropout=P), seed=0), scale=0.3)
    stacked = lf.stack([params] * 3)
    x = _x()

    def run(p):
        return lf.apply(model, p, x)

    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(run)(stacked)
    different = torch.func.vmap(run, randomness="different")(stacked)
    same = torch.func.vmap(run, randomness="same")(stacked)
    assert not torch.allclose(different[0], different[1]) and not torch.allclose(different[1], different[2])
    assert torch.equal(same[0], same[1]) and torch.equal(same[1], same[2])
    model.eval()
    quiet = torch.func.vmap(run)(stacked)  # no dropout in eval mode, so vmap needs no randomness
    torch.testing.assert_close(quiet[0], lf.apply(model, params, x), rtol=1e-6, atol=1e-6)


def test_mixed_batches_draw_a_mask_per_adapter():
    model = mlp()
    params = perturbed(lf.init(model, lf.LoRAConfig(r=2, dropout=P), seed=0), scale=0.3)
    stacked = lf.stack([params, params])
    x = _x(1).expand(4, 8)  # four identical rows, two per adapter
    out = lf.apply(model, stacked, x, adapter_ids=[0, 1, 0, 1])  # vmapped over the two adapters
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out[2])
    model.eval()
    out = lf.apply(model, stacked, x, adapter_ids=[0, 1, 0, 1])
    torch.testing.assert_close(out, lf.apply(model, params, x).expand(4, 8), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("value", [-0.1, 1.0, "0.1", True])
def test_dropout_must_be_a_probability(value):
    for config in (lf.LoRAConfig, lf.PiSSAConfig, lf.DoRAConfig, lf.EVAConfig):
        with pytest.raises(ValueError, match=r"`dropout` must be (a number in \[0, 1\)|a finite number)"):
            config(dropout=value)
