"""The invariants (docs/internals.md, "The contract") for every registered layer kind × every variant that
supports it, each on a small real architecture: a plain MLP (linear), GPT-2 (transformers Conv1D), a ResNet-like
CNN (convolutions), Qwen3's token embedding, Qwen3-MoE's fused experts, BERT with a fresh classification head
(`modules_to_save`), BERT's LayerNorms (norm)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from components import (
    classification_batch,
    cnn_batch,
    perturbed,
    qwen3_batch,
    snapshot,
    tiny_bert_classifier,
    tiny_cnn,
    tiny_config,
    tiny_gpt2,
    tiny_qwen3,
    tiny_qwen3_moe,
)
from conftest import NOT_IDENTITY_AT_INIT, assert_untouched
from torch import nn

import lora_func as lf
from lora_func._sites import call_model
from lora_func._variant import GradientCalibration, Intervention
from lora_func.kinds import KINDS, supports
from lora_func.variants import REGISTRY


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))


def _mean_square(out) -> torch.Tensor:
    return out.square().mean()


def _loss(out) -> torch.Tensor:
    return out.loss


def _logits(out) -> torch.Tensor:
    return out.logits


@dataclass
class KindSubject:
    build: Callable[[], nn.Module]
    batch: Any
    config: dict = field(default_factory=dict)  # the config fields that select this kind
    loss: Callable[[Any], torch.Tensor] = _loss
    output: Callable[[Any], torch.Tensor] = _logits


SUBJECTS = {
    "linear": lambda: KindSubject(
        tiny_mlp, torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)), {}, _mean_square, lambda o: o
    ),
    "conv1d": lambda: KindSubject(tiny_gpt2, qwen3_batch()),
    # Every conv of the CNN but the grouped one, whose LoRA update does not merge (tested in test_kinds.py).
    "conv": lambda: KindSubject(
        tiny_cnn, cnn_batch(), {"target_names": (r"^(stem|conv|down|dilated|pointwise)$",)}, _mean_square, lambda o: o
    ),
    "embedding": lambda: KindSubject(
        tiny_qwen3, qwen3_batch(), {"target_names": ("embed_tokens$",), "exclude_names": ()}
    ),
    "experts": lambda: KindSubject(
        tiny_qwen3_moe,
        qwen3_batch(),
        {"target_names": (), "target_parameters": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")},
    ),
    "saved": lambda: KindSubject(tiny_bert_classifier, classification_batch(), {"modules_to_save": ("classifier",)}),
    "norm": lambda: KindSubject(tiny_bert_classifier, classification_batch(), {"target_names": (r"LayerNorm$",)}),
    "block": lambda: KindSubject(tiny_qwen3, qwen3_batch()),
}
# Fields a method needs on one kind's subject: BOFT's blocks must divide every fan-in, and the CNN's stem has 27.
KIND_FIELDS = {("conv", "boft"): {"boft_block_size": 0, "boft_block_num": 1}}
CASES = [(kind, name) for kind in KINDS for name in sorted(REGISTRY) if supports(REGISTRY[name], kind)]


def test_every_kind_has_a_subject():
    assert set(SUBJECTS) == set(KINDS)


@functools.cache
def _subject(kind: str) -> KindSubject:
    return SUBJECTS[kind]()


@pytest.mark.parametrize("kind, name", CASES)
def test_kind_contract(kind, name, tmp_path):
    """Invariants 1-6 and 9 on one kind: untouched model, identity at init, every trainable leaf live, gradients
    on the leaves only, torch.func.grad == autograd, save -> load bitwise, merge equivalence."""
    subject = _subject(kind)
    model = subject.build()
    variant = REGISTRY[name]
    cfg = tiny_config(name, r=4, **subject.config, **KIND_FIELDS.get((kind, name), {}))
    before = snapshot(model)
    with torch.no_grad():
        base = subject.output(call_model(model, subject.batch))
    calibration = [subject.batch] if variant.calibrated else None
    loss = None  # LoRA-GA's gradients: of the subject's loss
    if variant.capability(GradientCalibration) is not None:
        loss = lambda m, batch: subject.loss(call_model(m, batch))  # noqa: E731
    params = lf.init(model, cfg, seed=0, calibration_data=calibration, calibration_loss=loss, progress=False)
    assert any(t.kind == kind for t in params.targets), [t.kind for t in params.targets]
    assert_untouched(model, before)

    with torch.no_grad():  # 2: identity at init (waived where the method does not start there)
        out = subject.output(lf.apply(model, params, subject.batch))
        if name not in NOT_IDENTITY_AT_INIT:
            torch.testing.assert_close(out, base, rtol=0, atol=1e-6)

    params = perturbed(params, scale=0.1)
    trainable, frozen = lf.split(params)
    keys = [(p, k) for p, k, _ in trainable.leaves()]
    out = subject.output(lf.apply(model, params, subject.batch))  # 3: every trainable leaf moves the output
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad((out * probe).sum(), [trainable[p][k] for p, k in keys])
    dead = [key for key, g in zip(keys, grads) if not g.abs().sum() > 0]
    assert not dead, f"leaves with no influence on the output: {dead[:5]}"

    subject.loss(lf.apply(model, params, subject.batch)).backward()  # 4: gradients on trainable leaves only
    assert_untouched(model, before)
    for _, leaf, tensor in frozen.leaves():
        assert tensor.grad is None and not tensor.requires_grad, leaf
    autograd = {(p, k): t.grad for p, k, t in trainable.leaves()}
    func = torch.func.grad(lambda t: subject.loss(lf.apply(model, lf.combine(t, frozen), subject.batch)))(trainable)
    for (path, leaf), g in autograd.items():  # 5
        torch.testing.assert_close(func[path][leaf], g, rtol=1e-5, atol=1e-6, msg=f"{path}.{leaf}")

    lf.save(params, tmp_path / "adapter.safetensors")  # 6: save -> load is bitwise
    loaded = lf.load(tmp_path / "adapter.safetensors", model)
    assert loaded.config == params.config and loaded.targets == params.targets and list(loaded) == list(params)
    for p, k, t in params.leaves():
        assert torch.equal(loaded[p][k], t.detach()) and loaded[p][k].requires_grad == t.requires_grad, f"{p}.{k}"
    with torch.no_grad():
        adapted = subject.output(lf.apply(model, params, subject.batch))
        assert torch.equal(subject.output(lf.apply(model, loaded, subject.batch)), adapted)

        if variant.capability(Intervention) is not None:  # 9: no weight form; refused by name
            with pytest.raises(ValueError, match=rf"merge: {params.targets[0].path!r}"):
                lf.merge(model, params)
            assert_untouched(model, before)
            return
        merged = lf.merge(model, params)  # 9: merge equivalence
        state = model.state_dict()
        for key, tensor in merged.items():
            assert key in state and tensor.shape == state[key].shape, key
        dense = subject.output(call_model_with(model, merged, subject.batch))
        torch.testing.assert_close(dense, adapted, rtol=1e-4, atol=1e-5)
    assert_untouched(model, before)


def call_model_with(model: nn.Module, weights: dict, batch: Any) -> Any:
    args, kwargs = ((), dict(batch)) if isinstance(batch, dict) else ((batch,), {})
    return torch.func.functional_call(model, weights, args, kwargs)
