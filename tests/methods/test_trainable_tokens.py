"""Trainable Tokens against its definition (the embedding with the chosen rows replaced) and against PEFT's
Trainable Tokens given the same rows: outputs, gradients (a padding row too), and files both ways."""

from __future__ import annotations

import copy

import pytest
import torch
from components import perturbed, qwen3_batch, tiny_qwen3
from peft_parity import assert_same_as_peft, twins

import lora_func as lf

peft = pytest.importorskip("peft")

LEAF = "trainable_tokens_delta"


def _peft_leaf(layer, leaf):
    return getattr(layer, leaf)["default"]


def _chosen(batch, extra=(3, 100)):
    """Six ids of the batch (one of them its most frequent, for `scale_grad_by_freq`) and ids it lacks."""
    ids = batch["input_ids"].flatten().tolist()
    present = sorted(set(ids), key=lambda i: -ids.count(i))[:6]
    return [*present, *(i for i in extra if i not in ids)]


def test_identity_at_init_and_the_embedding_with_rows_replaced():
    model, batch = tiny_qwen3().eval(), qwen3_batch()
    idx = _chosen(batch)
    params = lf.init(model, lf.TrainableTokensConfig(token_indices=idx), seed=0)
    assert [t.path for t in params.targets] == ["model.embed_tokens"]
    embedding = model.model.embed_tokens.weight
    assert torch.equal(params["model.embed_tokens"][LEAF], embedding[idx])
    with torch.no_grad():
        assert torch.equal(lf.apply(model, params, batch).logits, model(**batch).logits)
    params = perturbed(params, scale=0.3)
    rows = params["model.embed_tokens"][LEAF].detach()
    edited = copy.deepcopy(model)  # the definition: the embedding with the chosen rows replaced
    with torch.no_grad():
        edited.model.embed_tokens.weight[idx] = rows
        torch.testing.assert_close(lf.apply(model, params, batch).logits, edited(**batch).logits, rtol=0, atol=0)
    dw = lf.delta_weights(model, params)["model.embed_tokens.weight"]
    assert torch.equal(dw, edited.model.embed_tokens.weight - embedding)


@pytest.mark.parametrize("options", [{}, {"padding_idx": "chosen", "scale_grad_by_freq": True}], ids=["plain", "pad"])
def test_matches_peft_outputs_and_gradients(options):
    model, twin = twins()
    batch = qwen3_batch()
    idx = _chosen(batch)
    for m in (model, twin):
        if options:  # a chosen token is the padding row (no gradient) and gradients scale by frequency
            m.model.embed_tokens.padding_idx = idx[1]
            m.model.embed_tokens.scale_grad_by_freq = True
    params = perturbed(lf.init(model, lf.TrainableTokensConfig(token_indices=idx), seed=0), scale=0.3)
    peft_model = peft.get_peft_model(twin, peft.TrainableTokensConfig(token_indices=idx))
    with torch.no_grad():
        _peft_leaf(peft_model.get_base_model().model.embed_tokens, LEAF).copy_(params["model.embed_tokens"][LEAF])
    worst = assert_same_as_peft(model, params, peft_model, _peft_leaf)
    assert worst["logits"] <= 1e-5
    if options:
        assert torch.equal(params["model.embed_tokens"][LEAF].grad[1], torch.zeros(64))


def test_from_peft_gives_peft_logits_and_to_peft_loads_in_peft(tmp_path):
    model, twin = twins()
    model.eval(), twin.eval()
    batch = qwen3_batch()
    idx = _chosen(batch)
    peft_model = peft.get_peft_model(twin, peft.TrainableTokensConfig(token_indices=idx))
    with torch.no_grad():
        _peft_leaf(peft_model.get_base_model().model.embed_tokens, LEAF).add_(0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        ref = peft_model(**batch).logits
        params = lf.from_peft(tmp_path / "peft", model)
        assert params.config.token_indices == tuple(idx)
        torch.testing.assert_close(lf.apply(model, params, batch).logits, ref, rtol=0, atol=1e-5)
        lf.to_peft(params, tmp_path / "back", model=model)
        loaded = peft.PeftModel.from_pretrained(twins()[1].eval(), tmp_path / "back")
        torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=1e-5)


def test_bad_token_indices_are_refused_by_name():
    with pytest.raises(ValueError, match=r"`token_indices` is empty"):
        lf.TrainableTokensConfig(token_indices=())
    with pytest.raises(ValueError, match=r"`token_indices` names a token twice: \[5\]"):
        lf.TrainableTokensConfig(token_indices=(5, 1, 5))
    with pytest.raises(ValueError, match=r"`token_indices` holds 500, beyond the 128 rows of 'model.embed_tokens'"):
        lf.init(tiny_qwen3(), lf.TrainableTokensConfig(token_indices=(1, 500)))


def test_a_tied_output_head_is_refused_by_the_peft_exchange(tmp_path):
    """PEFT swaps the rows into a tied lm_head too; lora_func adapts the embedding alone: no silent difference."""
    model = tiny_qwen3(tie_word_embeddings=True)
    params = lf.init(model, lf.TrainableTokensConfig(token_indices=(1, 2)), seed=0)
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight is tied to \['lm_head.weight'\]"):
        lf.to_peft(params, tmp_path / "out", model=model)
    twin = peft.get_peft_model(tiny_qwen3(tie_word_embeddings=True), peft.TrainableTokensConfig(token_indices=[1, 2]))
    twin.save_pretrained(tmp_path / "peft")
    with pytest.raises(lf.AdapterFileError, match=r"is tied to \['lm_head.weight'\]"):
        lf.from_peft(tmp_path / "peft", model)
