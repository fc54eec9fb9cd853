"""Modules their parent reads without calling: `nn.MultiheadAttention` passes `out_proj.weight` to
`F.multi_head_attention_forward` and never calls `out_proj`, so no hook there ever runs.

Before: the default targets selected `self_attn.out_proj` in `nn.TransformerEncoderLayer`; its adapter had no
gradient and no effect, yet `merge` folded it in (merge off `apply` by 3.5 on this model). Now it is never a
target: passed over by default, refused by name when `target_names` selects it.
"""

from __future__ import annotations

import pytest
import torch
from components import perturbed, tiny_config
from torch import nn

import lora_func as lf
from lora_func._variant import GradientCalibration
from lora_func.variants import REGISTRY

VARIANTS = sorted(n for n, v in REGISTRY.items() if "linear" in v.kinds)  # the default targets: linear layers


def encoder(batch_first: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def adapter(name: str, model: nn.Module, x: torch.Tensor, **fields) -> lf.Params:
    kwargs = {"calibration_data": [x], "progress": False} if REGISTRY[name].calibrated else {}
    if REGISTRY[name].capability(GradientCalibration) is not None:  # LoRA-GA: gradients of a mean-square loss
        kwargs["calibration_loss"] = lambda m, batch: m(batch).square().mean()
    return perturbed(lf.init(model, tiny_config(name, r=4, **fields), seed=0, **kwargs), scale=0.3)


@pytest.mark.parametrize("name", VARIANTS)
def test_default_targets_are_all_live_and_merge_equals_apply(name):
    if "linear" not in REGISTRY[name].kinds:
        pytest.skip(f"{name} adapts no linear layer")
    model, x = encoder(), torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    params = adapter(name, model, x)
    paths = [t.path for t in params.targets]
    assert paths == [f"layers.{i}.{n}" for i in range(2) for n in ("linear1", "linear2")]
    out = lf.apply(model, params, x)
    leaves = [(f"{p}.{k}", t) for p, k, t in lf.split(params)[0].leaves()]
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((out * probe).sum(), [t for _, t in leaves])
    dead = [key for (key, _), g in zip(leaves, grads) if not g.abs().sum() > 0]
    assert not dead, f"leaves with no effect: {dead}"
    with torch.no_grad():
        merged = torch.func.functional_call(model, lf.merge(model, params), (x,))
        base = model(x)
    torch.testing.assert_close(out.detach(), merged, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out.detach(), base, atol=1e-2)


@pytest.mark.parametrize("batch_first", [True, False])
def test_inference_fast_path_runs_the_adapter(batch_first):
    """Eval mode without grad is where `nn.TransformerEncoderLayer` and `nn.MultiheadAttention` take their fused
    fast path (reading `linear1`/`linear2` weights too): inside `lf.inject` the adapter still acts, as merged."""
    model, x = encoder(batch_first).eval(), torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    params = adapter("lora", model, x)
    with torch.no_grad():
        with lf.inject(model, params):
            got = model(x)
        want = torch.func.functional_call(model, lf.merge(model, params), (x,))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern", ["out_proj", r"layers\.0\.self_attn", ".*"])
def test_target_names_selecting_out_proj_is_refused_by_name(pattern):
    model = encoder()
    message = r"`target_names` selects 'layers.0.self_attn.out_proj', which its model never calls: nn.MultiheadAttn"
    message = message.replace("MultiheadAttn", r"MultiheadAttention 'layers.0.self_attn' reads `out_proj.weight`")
    for call in (lf.targets, lf.init):
        with pytest.raises(ValueError, match=message):
            call(model, lf.LoRAConfig(r=2, target_names=(pattern,)))


def test_excluding_out_proj_by_name_is_accepted():
    model = encoder()
    cfg = lf.LoRAConfig(r=2, target_names=("out_proj", "linear1"), exclude_names=("out_proj",))
    assert [t.path for t in lf.targets(model, cfg)] == ["layers.0.linear1", "layers.1.linear1"]


def test_a_bare_multihead_attention_has_no_target():
    with pytest.raises(ValueError, match="LoRAConfig selects no module of MultiheadAttention"):
        lf.init(nn.MultiheadAttention(32, 2), lf.LoRAConfig(r=2))
