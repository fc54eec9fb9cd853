"""`modules_to_save`: whole modules (a classification head) trained as full copies inside the adapter."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from components import classification_batch, perturbed, snapshot, tiny_bert_classifier, tiny_qwen3
from conftest import assert_untouched, minilm_batch, minilm_parts

import lora_func as lf


def _train(model, params, batch, steps=20, lr=1e-2) -> list[float]:
    opt = torch.optim.AdamW(lf.trainable_leaves(params), lr=lr)
    losses = []
    for _ in range(steps):
        loss = lf.apply(model, params, batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_a_fresh_head_trains_as_a_copy_and_the_model_is_untouched():
    model = tiny_bert_classifier()
    before = snapshot(model)
    params = lf.init(model, lf.LoRAConfig(r=4, modules_to_save=("classifier",)), seed=0)
    saved = [t for t in params.targets if t.kind == "saved"]
    assert [t.path for t in saved] == ["classifier"] and saved[0].get("parameters") == (
        ("weight", (3, 32)),
        ("bias", (3,)),
    )
    assert "classifier" not in {t.path for t in params.targets if t.kind != "saved"}  # saved, not adapted
    head = params["classifier"]
    assert torch.equal(head["weight"], model.classifier.weight) and head["weight"].requires_grad
    assert head["weight"].data_ptr() != model.classifier.weight.data_ptr()
    initial = {k: v.detach().clone() for k, v in head.items()}
    losses = _train(model, params, classification_batch())
    assert losses[-1] < 0.5 * losses[0], losses
    assert not torch.equal(head["weight"], initial["weight"]) and not torch.equal(head["bias"], initial["bias"])
    assert_untouched(model, before)  # the model's own head, flags and gradients are as they were

    merged = lf.merge(model, params)  # the copies are folded in like any weight
    assert torch.equal(merged["classifier.weight"], head["weight"].detach())
    with torch.no_grad():
        dense = torch.func.functional_call(model, merged, (), classification_batch()).logits
        torch.testing.assert_close(dense, lf.apply(model, params, classification_batch()).logits, rtol=1e-5, atol=1e-6)


def test_a_base_parameter_that_requires_grad_gets_no_gradient_without_modules_to_save():
    model = tiny_bert_classifier()
    assert model.classifier.weight.requires_grad  # as a freshly built HF model
    params = lf.init(model, lf.LoRAConfig(r=2), seed=0)  # the head is a LoRA target here
    before = snapshot(model)
    lf.apply(model, params, classification_batch()).loss.backward()
    assert model.classifier.weight.grad is None
    assert_untouched(model, before)


def test_pretrained_minilm_with_a_new_classification_head():
    from transformers import BertForSequenceClassification

    state, _, config = minilm_parts()
    config = copy.deepcopy(config)
    config.num_labels, config.hidden_dropout_prob, config.attention_probs_dropout_prob = 2, 0.0, 0.0
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    missing, unexpected = model.bert.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    model.train()
    texts = ("Return the base-2 logarithm of x.", "Open the file and return a stream.") * 2
    batch = {**minilm_batch(texts), "labels": torch.tensor([0, 1, 0, 1])}
    before = snapshot(model)
    params = lf.init(model, lf.LoRAConfig(r=4, target_names=(r"query$", r"value$"), modules_to_save=("classifier",)))
    initial = params["classifier"]["weight"].detach().clone()
    losses = _train(model, params, batch, steps=12, lr=5e-3)
    assert losses[-1] < 0.5 * losses[0], losses
    assert not torch.equal(params["classifier"]["weight"], initial)
    assert_untouched(model, before)


def test_modules_to_save_matches_peft():
    from peft import LoraConfig, get_peft_model

    model = tiny_bert_classifier()
    targets = ("query", "value")
    params = perturbed(
        lf.init(
            model, lf.LoRAConfig(r=4, alpha=8, target_names=(r"query$", r"value$"), modules_to_save=("classifier",))
        ),
        scale=0.2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            copy.deepcopy(model),
            LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), modules_to_save=["classifier"]),
        )
    base = peft_model.get_base_model()
    pairs = {}
    with torch.no_grad():
        for path, leaf, tensor in params.leaves():
            if path == "classifier":
                ref = base.classifier.modules_to_save["default"].get_parameter(leaf)
            else:
                ref = base.get_submodule(path).get_parameter(
                    {"A": "lora_A.default.weight", "B": "lora_B.default.weight"}[leaf]
                )
            ref.copy_(tensor)
            pairs[(path, leaf)] = (tensor, ref)
    batch = classification_batch()
    out, ref = lf.apply(model, params, batch), peft_model(**batch)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-6)
    out.loss.backward()
    ref.loss.backward()
    for key, (tensor, reference) in pairs.items():
        torch.testing.assert_close(tensor.grad, reference.grad, rtol=1e-4, atol=1e-7, msg=str(key))


def test_modules_to_save_errors_name_the_problem():
    model = tiny_bert_classifier()
    with pytest.raises(ValueError, match="`modules_to_save` name 'nohead' matches no module"):
        lf.init(model, lf.LoRAConfig(modules_to_save=("nohead",)))
    with pytest.raises(ValueError, match=r"`modules_to_save` must hold module names \(dotted paths\), got ''"):
        lf.LoRAConfig(modules_to_save=("",))
    tied = tiny_qwen3(tie_word_embeddings=True)
    with pytest.raises(
        ValueError, match=r"copies lm_head.weight, which the model ties to \['model.embed_tokens.weight'\]"
    ):
        lf.init(tied, lf.LoRAConfig(modules_to_save=("lm_head",)))
    # A whole submodule tree: one entry per module that owns parameters.
    params = lf.init(model, lf.IA3Config(modules_to_save=("pooler",)))
    assert [t.path for t in params.targets if t.kind == "saved"] == ["bert.pooler.dense"]
    params = lf.init(model, lf.IA3Config(target_names=(), modules_to_save=("classifier",)))  # the head alone
    assert [t.kind for t in params.targets] == ["saved"]
