"""`lf.AdapterModule`: the adapter as an nn.Module. Its parameters are the adapter's trainable leaves, its forward
is `lf.apply`, its state dict the adapter; the base model stays outside the module tree and untouched."""

from __future__ import annotations

import inspect

import pytest
import torch
from components import changes, qwen3_batch, snapshot, tiny_config, tiny_qwen3

import lora_func as lf
from lora_func.variants import REGISTRY


def build(cfg: lf.AdapterConfig | None = None, seed: int = 0):
    model = tiny_qwen3()
    cfg = cfg or lf.LoRAConfig(r=4, alpha=8)
    calibration = [qwen3_batch(batch=4)] if REGISTRY[_name(cfg)].calibrated else None
    return model, lf.init(model, cfg, seed=seed, calibration_data=calibration)


def _name(cfg) -> str:
    return next(n for n, v in REGISTRY.items() if v.config is type(cfg))


@pytest.mark.parametrize("name", list(REGISTRY))
def test_parameters_are_the_trainable_leaves_and_forward_is_apply(name):
    """For every variant: parameters() are exactly `lf.trainable_leaves(module.params)` (the same objects), frozen
    leaves are buffers, the state dict is the whole adapter, and forward + backward equal `lf.apply`'s."""
    model, params = build(tiny_config(name, r=4))
    params = _perturbed(params)
    module = lf.AdapterModule(model, params)
    assert [id(p) for p in module.parameters()] == [id(t) for t in lf.trainable_leaves(module.params)]
    trainable, frozen = lf.split(module.params)
    assert sum(len(e) for e in frozen.values()) == len(list(module.buffers()))
    assert list(module.state_dict()) == [f"adapter.{p}.{leaf}" for p, leaf, _ in params.leaves()]
    for (_, _, mine), (_, _, given) in zip(module.params.leaves(), params.leaves()):
        assert mine.data_ptr() == given.data_ptr()  # the same storage: no copy

    batch = qwen3_batch()
    before = snapshot(model)
    out = module(**batch)
    out.loss.backward()
    reference = lf.apply(model, params, batch)
    reference.loss.backward()
    torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=0)
    for (path, leaf, mine), (_, _, given) in zip(trainable.leaves(), lf.split(params)[0].leaves()):
        torch.testing.assert_close(mine.grad, given.grad, rtol=1e-6, atol=1e-7, msg=f"{path}.{leaf}")
    assert changes(model, before) == []


def _perturbed(params):
    from components import perturbed

    return perturbed(params)


def test_the_base_model_is_outside_the_module_tree():
    model, params = build()
    module = lf.AdapterModule(model, params)
    base = {id(p) for p in model.parameters()}
    assert not base & {id(p) for p in module.parameters()}
    assert not any(k.startswith("model.") for k in module.state_dict())
    assert module.base_model is model and model not in list(module.modules())
    assert sum(p.numel() for p in module.parameters()) == params.num_params()


def test_forward_has_the_model_signature_and_passes_everything_through():
    """HF Trainer reads `forward`'s signature to keep batch columns (`remove_unused_columns`) and to decide whether
    to pass `num_items_in_batch`; a positional call works as on the model."""
    model, params = build()
    module = lf.AdapterModule(model, lf.init(model, lf.LoRAConfig(r=4), seed=0))
    assert inspect.signature(module.forward) == inspect.signature(model.forward)
    assert "labels" in inspect.signature(lf.AdapterModule.forward).parameters  # Trainer's find_labels reads the class
    batch = qwen3_batch()
    n = int((batch["labels"][:, 1:] != -100).sum())
    summed = module(**batch, num_items_in_batch=torch.tensor(n // 2)).loss  # the sum over tokens / (n / 2)
    torch.testing.assert_close(summed, 2 * module(**batch).loss)
    torch.testing.assert_close(module(batch["input_ids"]).logits, module(input_ids=batch["input_ids"]).logits)


def test_to_train_eval_and_dtype_reach_the_base_model():
    model, params = build()
    module = lf.AdapterModule(model, params)
    module.eval()
    assert not model.training and not module.training
    module.train()
    assert model.training
    module.to(torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert module.params.config.dtype == torch.float64 and {p.dtype for p in module.parameters()} == {torch.float64}
    batch = qwen3_batch()
    torch.testing.assert_close(module(**batch).logits, lf.apply(model, module.params, batch).logits)
    module.float()
    assert module.params.config.dtype == torch.float32


def test_gradient_checkpointing_enable_reaches_the_base_model():
    model, params = build()
    module = lf.AdapterModule(model, _perturbed(params))
    batch = qwen3_batch()
    module(**batch).loss.backward()
    expected = [t.grad.clone() for t in module.parameters()]
    module.zero_grad()
    module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert model.model.gradient_checkpointing
    loss = module(**batch).loss / 2  # the output dropped before backward
    (loss * 2).backward()
    for got, want in zip(module.parameters(), expected):
        torch.testing.assert_close(got.grad, want, rtol=1e-5, atol=1e-7)


def test_load_state_dict_is_strict_whatever_strict_says():
    model, params = build()
    module = lf.AdapterModule(model, params)
    trained = lf.AdapterModule(model, _perturbed(params))
    state = trained.state_dict()
    module.load_state_dict(state, strict=False)  # what Trainer calls when it resumes
    for a, b in zip(module.parameters(), trained.parameters()):
        assert torch.equal(a, b)
    first = next(iter(state))
    with pytest.raises(ValueError, match="missing keys .*" + first.replace(".", r"\.")):
        module.load_state_dict({k: v for k, v in state.items() if k != first}, strict=False)
    with pytest.raises(ValueError, match=r"unexpected keys \['adapter.extra'\]"):
        module.load_state_dict({**state, "adapter.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=f"{first}.*dtype torch.float64"):
        module.load_state_dict({**state, first: state[first].double()})


def test_frozen_leaves_are_buffers_not_parameters():
    model, params = build()
    module = lf.AdapterModule(model, lf.freeze(params, leaves="A"))
    assert {name.rsplit(".", 1)[1] for name, _ in module.named_parameters()} == {"B"}
    assert {name.rsplit(".", 1)[1] for name, _ in module.named_buffers()} == {"A"}
    assert len(module.state_dict()) == sum(len(e) for e in params.values())


def test_bad_input_is_refused_by_name():
    model, params = build()
    with pytest.raises(TypeError, match="`params` must be lora_func Params"):
        lf.AdapterModule(model, dict(params))
    with pytest.raises(ValueError, match="stacks several adapters"):
        lf.AdapterModule(model, lf.stack([params, params]))
    with pytest.raises(ValueError, match="is not a module of"):
        lf.AdapterModule(tiny_qwen3(num_hidden_layers=1), params)
    module = lf.AdapterModule(model, params)
    with pytest.raises(AttributeError, match=r"lf.save\(module.params"):
        module.save_pretrained("somewhere")
    assert not hasattr(module, "save_pretrained")


@pytest.mark.skipif(not hasattr(lf, "inject"), reason="AdapterModule.generate runs inside lf.inject")
def test_generate_runs_with_the_adapter_at_every_step():
    """Greedy decoding with the KV cache: the tokens a copy of the model with the adapter merged into its weights
    generates; the base model afterwards generates as before."""
    import copy

    model, params = build()
    model.eval()
    params = _perturbed(params)
    module = lf.AdapterModule(model, params)
    prompt = qwen3_batch(batch=2, seq=5)["input_ids"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    base = model.generate(prompt, **kwargs)
    merged = copy.deepcopy(model)
    merged.load_state_dict(lf.merge(model, params), strict=False)
    expected = merged.generate(prompt, **kwargs)
    assert not torch.equal(expected, base)
    assert torch.equal(module.generate(prompt, **kwargs), expected)
    assert torch.equal(model.generate(prompt, **kwargs), base)
