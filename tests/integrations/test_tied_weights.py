"""Tied weights (`tie_word_embeddings=True`): `lm_head` and `embed_tokens` share one tensor.

`lf.apply` adapts the targeted module alone; a merged weight written into the shared tensor would move its twin
too (measured before the fix: logits off `lf.apply` by 88 for `lm_head`, 254 for `embed_tokens`, silently). So
`lf.merge` refuses such a target by name, and once the user unties it as the error says, merging is exact.
"""

from __future__ import annotations

import copy

import pytest
import torch
from components import perturbed, qwen3_batch, tiny_config, tiny_qwen3
from torch import nn

import lora_func as lf
from lora_func.variants import REGISTRY

VARIANTS = sorted(REGISTRY)
EMBEDDING_VARIANTS = sorted(n for n, v in REGISTRY.items() if "embedding" in v.kinds)


def tied_model() -> nn.Module:
    model = tiny_qwen3(num_hidden_layers=1, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def adapter(name: str, model: nn.Module, batch, target: str) -> lf.Params:
    cfg = tiny_config(name, r=4, target_names=(target,), exclude_names=())
    kwargs = {"calibration_data": [batch], "progress": False} if REGISTRY[name].calibrated else {}
    return perturbed(lf.init(model, cfg, seed=0, **kwargs), scale=0.3)


def untied(model: nn.Module, path: str) -> nn.Module:
    """A copy of `model` with the recipe the error gives applied: the target holds its own weight."""
    twin = copy.deepcopy(model)
    module = twin.get_submodule(path)
    module.weight = nn.Parameter(module.weight.detach().clone())
    twin.config.tie_word_embeddings = False
    return twin


@pytest.mark.parametrize("name", [n for n in VARIANTS if "linear" in REGISTRY[n].kinds])
def test_merge_refuses_a_tied_lm_head_and_merges_it_once_untied(name):
    model, batch = tied_model(), qwen3_batch()
    params = adapter(name, model, batch, "lm_head")
    embedding = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError, match=r"merge: 'lm_head.weight' is tied to \['model.embed_tokens.weight'\]"):
        lf.merge(model, params)

    with torch.no_grad():
        got = lf.apply(model, params, batch).logits
        hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state  # the body is not adapted
    # Independent reference: the untied copy with the merged lm_head loaded as a checkpoint would be.
    copy_ = untied(model, "lm_head")
    merged = {k: v.detach() for k, v in lf.merge(copy_, params).items()}
    assert list(merged) == ["lm_head.weight"]
    copy_.load_state_dict(merged, strict=False)
    with torch.no_grad():
        want = copy_(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want, hidden @ merged["lm_head.weight"].t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(copy_.model.embed_tokens.weight, embedding)  # the embedding did not move
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert not torch.allclose(got, model(**batch).logits, atol=1e-3)  # the adapter acts


@pytest.mark.parametrize("name", EMBEDDING_VARIANTS)
def test_merge_refuses_a_tied_embedding(name):
    model, batch = tied_model(), qwen3_batch()
    params = adapter(name, model, batch, "embed_tokens")
    with pytest.raises(ValueError, match=r"'model.embed_tokens.weight' is tied to \['lm_head.weight'\].*Untie it"):
        lf.merge(model, params)
    copy_ = untied(model, "model.embed_tokens")
    with torch.no_grad():
        got = lf.apply(model, params, batch).logits
        want = torch.func.functional_call(copy_, lf.merge(copy_, params), (), batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_module_called_at_two_places_still_merges():
    """One module object reached by two paths (not a tie between modules): `apply` adapts both calls, and so does
    the merged weight, which `functional_call` writes under both names. Not refused."""
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    x = torch.randn(3, 8)
    params = perturbed(lf.init(model, lf.LoRAConfig(r=2, alpha=4), seed=0), scale=0.3)
    assert [t.path for t in params.targets] == ["0"]
    W = shared.weight + 2 * params["0"]["B"] @ params["0"]["A"]  # s = alpha / r = 2
    dense = torch.tanh(x @ W.t() + shared.bias) @ W.t() + shared.bias
    with torch.no_grad():
        torch.testing.assert_close(lf.apply(model, params, x), dense, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.func.functional_call(model, lf.merge(model, params), (x,)), dense)


def test_untied_model_is_unaffected():
    """`tie_word_embeddings=False`: merge of `lm_head` is the plain exact merge, nothing refused."""
    model, batch = tiny_qwen3(num_hidden_layers=1), qwen3_batch()
    params = adapter("lora", model, batch, "lm_head")
    with torch.no_grad():
        torch.testing.assert_close(
            torch.func.functional_call(model, lf.merge(model, params), (), batch).logits,
            lf.apply(model, params, batch).logits,
        )
