"""Layer kinds beyond nn.Linear, against their references: transformers' Conv1D against the same model with
nn.Linear layers, convolutions / embeddings / fused experts against PEFT given the same leaf values and
against the dense reference (functional_call with the merged weights), and the refusals."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from components import (
    cnn_batch,
    perturbed,
    qwen3_batch,
    snapshot,
    tiny_cnn,
    tiny_config,
    tiny_gpt2,
    tiny_qwen3,
    tiny_qwen3_moe,
    with_linear_layers,
)
from conftest import assert_untouched

import lora_func as lf
from lora_func.kinds import KINDS
from lora_func.variants import REGISTRY

VARIANTS = sorted(REGISTRY)
PEFT_CONVS = ["stem", "conv", "mix", "down", "pointwise"]  # PEFT's conv A has no dilation: not `dilated`
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _init(model, cfg, batch, seed=0):
    if REGISTRY[lf.variants.variant_for(cfg).name].calibrated:
        return lf.init(model, cfg, seed=seed, calibration_data=[batch], progress=False)
    return lf.init(model, cfg, seed=seed)


def _peft(model, config):
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about grouped convs and deprecated transformers names
        return get_peft_model(copy.deepcopy(model), config)


def _peft_layer(peft_model, path):
    return peft_model.get_base_model().get_submodule(path)


def _same_grads(params, pairs, rtol=1e-4, atol=1e-6) -> float:
    """Each (leaf tensor, PEFT parameter) pair has the same gradient (reshaped); returns the largest difference."""
    worst = 0.0
    for (path, leaf), (tensor, reference) in pairs.items():
        got = tensor.grad.reshape(reference.grad.shape)
        torch.testing.assert_close(got, reference.grad, rtol=rtol, atol=atol, msg=f"{path}.{leaf}")
        worst = max(worst, (got - reference.grad).abs().max().item())
    return worst


def test_registry_and_default_targets():
    assert set(KINDS) == {"linear", "conv1d", "conv", "embedding", "experts", "norm", "saved", "block"}
    found = lf.targets(tiny_gpt2(), lf.LoRAConfig(r=4))  # Conv1D is linear-like: targeted by default
    assert {t.kind for t in found} == {"conv1d"} and len(found) == 8
    assert found[0].path == "transformer.h.0.attn.c_attn" and (found[0].d_in, found[0].d_out) == (32, 96)
    assert "lm_head" not in {t.path for t in found}
    cnn = lf.targets(tiny_cnn(), lf.LoRAConfig(r=2))  # convolutions only when named
    assert [t.path for t in cnn] == ["head"]


# ---- transformers Conv1D: every variant computes what it computes on nn.Linear with the transposed weights ------


@pytest.mark.parametrize("name", [n for n in VARIANTS if "conv1d" in REGISTRY[n].kinds])
def test_conv1d_equals_the_linear_copy(name):
    if "conv1d" not in REGISTRY[name].kinds:
        pytest.skip(f"{name} adapts no Conv1D layer")
    model = tiny_gpt2()
    twin = with_linear_layers(model)
    batch = qwen3_batch()
    cfg = tiny_config(name, r=4)
    reference = perturbed(_init(twin, cfg, batch))
    params = _init(model, cfg, batch)
    assert {t.kind for t in params.targets} == {"conv1d"} and {t.kind for t in reference.targets} == {"linear"}
    assert [t.path for t in params.targets] == [t.path for t in reference.targets]
    for path, leaf, tensor in lf.split(params)[1].leaves():  # frozen leaves from W (SVDs, norms): the same W
        torch.testing.assert_close(tensor, reference[path][leaf], rtol=1e-4, atol=1e-5, msg=f"{path}.{leaf}")
    # The same leaf values on both (copies, so that gradients stay apart).
    same = params.replace(
        {p: {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in e.items()} for p, e in reference.items()}
    )
    out, ref = lf.apply(model, same, batch), lf.apply(twin, reference, batch)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=2e-6)
    out.loss.backward()
    ref.loss.backward()
    for (path, leaf, tensor), (_, _, expected) in zip(lf.split(same)[0].leaves(), lf.split(reference)[0].leaves()):
        torch.testing.assert_close(tensor.grad, expected.grad, rtol=1e-4, atol=1e-6, msg=f"{path}.{leaf}")
    merged, merged_ref = lf.merge(model, same), lf.merge(twin, reference)
    assert set(merged) == set(merged_ref)
    for key, tensor in merged.items():  # Conv1D weights come back in Conv1D's (d_in, d_out) layout
        expected = merged_ref[key].t() if key.endswith(".weight") else merged_ref[key]
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6, msg=key)


# ---- convolutions ----------------------------------------------------------------------------------------------


def _conv_peft(name, model, targets):
    from peft import IA3Config, LoraConfig

    if name in ("lora", "dora"):
        return _peft(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=name == "dora"))
    feedforward = targets if name == "ia3ff" else []
    return _peft(model, IA3Config(target_modules=targets, feedforward_modules=feedforward))


CONV_PEFT_NAMES = {"A": "lora_A.default.weight", "B": "lora_B.default.weight", "l": "ia3_l.default"}


@pytest.mark.parametrize("name", ["lora", "dora", "ia3", "ia3ff"])
def test_conv_matches_peft(name):
    """Same leaves, same outputs and gradients as PEFT's Conv2d layers (LoRA, DoRA, IA3 on outputs and inputs),
    over plain, 'same'-padded, grouped, strided and 1×1 convolutions (DoRA: not the grouped one)."""
    model = tiny_cnn()
    targets = [t for t in PEFT_CONVS if not (name == "dora" and t == "mix")]
    cfg = tiny_config(name, r=4, alpha=8, target_names=tuple(f"^{t}$" for t in targets))
    params = perturbed(lf.init(model, cfg, seed=0), scale=0.2)
    peft_model = _conv_peft(name, model, targets)
    pairs = {}
    with torch.no_grad():
        for path, leaf, tensor in lf.split(params)[0].leaves():
            layer = _peft_layer(peft_model, path)
            ref = (
                layer.lora_magnitude_vector["default"].weight
                if leaf == "magnitude"
                else (layer.get_parameter(CONV_PEFT_NAMES[leaf]))
            )
            ref.copy_(tensor.reshape(ref.shape))
            pairs[(path, leaf)] = (tensor, ref)
    x = cnn_batch()
    out, ref = lf.apply(model, params, x), peft_model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    _same_grads(params, pairs)


@pytest.mark.parametrize("conv", [torch.nn.Conv1d, torch.nn.Conv3d])
def test_conv1d_and_conv3d_lora_match_peft_and_merge(conv):
    from peft import LoraConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(conv(4, 6, 3, stride=2, padding=1), torch.nn.ReLU(), conv(6, 6, 1))
    params = perturbed(lf.init(model, lf.LoRAConfig(r=2, alpha=4, target_names=("^0$", "^2$")), seed=0), scale=0.3)
    peft_model = _peft(model, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    with torch.no_grad():
        for path, leaf, tensor in params.leaves():
            _peft_layer(peft_model, path).get_parameter(CONV_PEFT_NAMES[leaf]).copy_(tensor)
    x = torch.randn(2, 4, *(9,) * (1 if conv is torch.nn.Conv1d else 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = lf.apply(model, params, x)
        torch.testing.assert_close(out, peft_model(x), rtol=0, atol=1e-5)
        dense = torch.func.functional_call(model, lf.merge(model, params), (x,))
        torch.testing.assert_close(dense, out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lf.apply(model, params, x[0]), out[0], rtol=1e-5, atol=1e-5)  # unbatched input


def test_conv_with_dilation_and_reflect_padding_merges():
    """A's conv takes the layer's dilation and padding mode, so B A is the layer's own kind of kernel."""
    model = tiny_cnn()
    for name in ("lora", "dora", "ia3", "ia3ff"):
        params = perturbed(lf.init(model, tiny_config(name, r=4, target_names=("^dilated$",)), seed=0), 0.2)
        x = cnn_batch()
        with torch.no_grad():
            dense = torch.func.functional_call(model, lf.merge(model, params), (x,))
            torch.testing.assert_close(dense, lf.apply(model, params, x), rtol=1e-5, atol=1e-6, msg=name)


def test_grouped_conv_runs_but_does_not_merge_and_dora_refuses_it():
    model = tiny_cnn()
    params = perturbed(lf.init(model, lf.LoRAConfig(r=4, target_names=("^mix$",)), seed=0))
    lf.apply(model, params, cnn_batch())
    with pytest.raises(ValueError, match=r"merge: 'mix' \(Conv2d, groups=2\).*not a grouped kernel"):
        lf.merge(model, params)
    with pytest.raises(ValueError, match=r"DoRAConfig cannot adapt 'mix' \(Conv2d, groups=2\)"):
        lf.init(model, lf.DoRAConfig(r=4, target_names=("^mix$",)))
    with pytest.raises(ValueError, match=r"`r`=3 is not a multiple of groups=2 of 'mix'"):
        lf.init(model, lf.LoRAConfig(r=3, target_names=("^mix$",)))
    # IA3's gains do merge on a grouped conv: each output channel's kernel scales by its own group's inputs.
    for name in ("ia3", "ia3ff"):
        params = perturbed(lf.init(model, tiny_config(name, target_names=("^mix$",)), seed=0), 0.3)
        with torch.no_grad():
            dense = torch.func.functional_call(model, lf.merge(model, params), (cnn_batch(),))
            torch.testing.assert_close(dense, lf.apply(model, params, cnn_batch()), rtol=1e-5, atol=1e-6)


CONV_METHODS = {name for name in VARIANTS if "conv" in REGISTRY[name].kinds}  # adapt convolutions (their own tests)


@pytest.mark.parametrize("name", sorted(set(VARIANTS) - CONV_METHODS))
def test_variants_refuse_kinds_they_do_not_support(name):
    cfg = tiny_config(name, r=4, target_names=("^stem$",))
    kinds = ", ".join(REGISTRY[name].kinds)
    message = rf"{type(cfg).__name__} cannot adapt 'stem' \(Conv2d\): {name} supports {kinds}"
    with pytest.raises(ValueError, match=message):
        lf.targets(tiny_cnn(), cfg)
    with pytest.raises(ValueError, match=message):
        lf.init(tiny_cnn(), cfg, calibration_data=[cnn_batch()] if REGISTRY[name].calibrated else None)


# ---- embeddings ------------------------------------------------------------------------------------------------


def test_embedding_lora_matches_peft_and_the_dense_reference():
    from peft import LoraConfig

    model = tiny_qwen3()
    cfg = lf.LoRAConfig(r=4, alpha=8, target_names=("embed_tokens$",), exclude_names=())
    params = lf.init(model, cfg, seed=0)
    (target,) = params.targets
    assert (target.kind, target.d_in, target.d_out) == ("embedding", 128, 64)
    assert params[target.path]["A"].shape == (4, 128) and params[target.path]["B"].shape == (64, 4)
    assert not params[target.path]["A"].any()  # PEFT's init: A = 0, B normal
    batch = qwen3_batch()
    with torch.no_grad():
        torch.testing.assert_close(lf.apply(model, params, batch).logits, model(**batch).logits, rtol=0, atol=0)
    params = perturbed(params, scale=0.2)
    peft_model = _peft(model, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    layer = _peft_layer(peft_model, target.path)
    pairs = {}
    with torch.no_grad():
        for leaf, name in (("A", "lora_embedding_A"), ("B", "lora_embedding_B")):
            getattr(layer, name)["default"].copy_(params[target.path][leaf])
            pairs[(target.path, leaf)] = (params[target.path][leaf], getattr(layer, name)["default"])
    out, ref = lf.apply(model, params, batch), peft_model(**batch)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    _same_grads(params, pairs)
    merged = lf.merge(model, params)
    assert merged[f"{target.path}.weight"].shape == (128, 64)  # the embedding's own layout
    with torch.no_grad():
        dense = torch.func.functional_call(model, merged, (), batch).logits
    torch.testing.assert_close(dense, out.logits.detach(), rtol=1e-5, atol=1e-5)


def test_embedding_with_max_norm_is_refused():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, max_norm=1.0), torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"'0' \(Embedding\) has `max_norm`=1.0"):
        lf.targets(model, lf.LoRAConfig(r=2, target_names=("^0$",)))


# ---- fused experts ---------------------------------------------------------------------------------------------


def _peft_experts(peft_model):
    """{target path: PEFT ParamWrapper} of a PEFT model with `target_parameters`."""
    wrappers = {}
    for name, module in peft_model.get_base_model().named_modules():
        if hasattr(module, "parameter_name"):
            owner = name.replace(".base_layer", "")
            wrappers[f"{owner}.{module.parameter_name}"] = module
    return wrappers


def to_peft_experts(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_func's (E, r, d_in), (E, d_out, r) as PEFT's lora_A (E·r, d_in), lora_B (d_out, r·E) (expert-minor)."""
    E, r, d_in = A.shape
    return A.reshape(E * r, d_in), B.permute(1, 2, 0).reshape(B.shape[1], r * E)


def test_experts_lora_matches_peft_and_the_dense_reference():
    from peft import LoraConfig

    model = tiny_qwen3_moe()
    cfg = lf.LoRAConfig(r=2, alpha=4, target_names=(), target_parameters=EXPERTS)
    params = lf.init(model, cfg, seed=0)
    paths = [t.path for t in params.targets]
    assert paths == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]
    gate_up = params.targets[0]
    assert (gate_up.kind, gate_up.d_in, gate_up.d_out, gate_up.get("experts")) == ("experts", 32, 32, 4)
    assert params[gate_up.path]["A"].shape == (4, 2, 32) and params[gate_up.path]["B"].shape == (4, 32, 2)
    batch = qwen3_batch()
    before = snapshot(model)
    with torch.no_grad():
        base = model(**batch).logits
        torch.testing.assert_close(lf.apply(model, params, batch).logits, base, rtol=0, atol=0)
    params = perturbed(params, scale=0.3)
    peft_model = _peft(model, LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=list(EXPERTS)))
    wrappers = _peft_experts(peft_model)
    assert sorted(wrappers) == sorted(paths)
    with torch.no_grad():
        for path in paths:
            A, B = to_peft_experts(params[path]["A"], params[path]["B"])
            wrappers[path].lora_A["default"].weight.copy_(A)
            wrappers[path].lora_B["default"].weight.copy_(B)
    out, ref = lf.apply(model, params, batch), peft_model(**batch)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    assert not torch.allclose(out.logits, base, atol=1e-3)
    out.loss.backward()
    ref.loss.backward()
    for path in paths:
        dA, dB = to_peft_experts(params[path]["A"].grad, params[path]["B"].grad)
        torch.testing.assert_close(dA, wrappers[path].lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(dB, wrappers[path].lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
    assert_untouched(model, before)
    merged = lf.merge(model, params)
    assert sorted(merged) == sorted(paths)  # the parameters' own names
    with torch.no_grad():
        dense = torch.func.functional_call(model, merged, (), batch).logits
    torch.testing.assert_close(dense, out.logits.detach(), rtol=1e-5, atol=1e-5)


def test_experts_with_module_targets_and_refusals():
    model = tiny_qwen3_moe()
    both = lf.targets(model, lf.LoRAConfig(r=2, target_parameters=("gate_up_proj",)))
    assert {t.kind for t in both} == {"linear", "experts"} and len([t for t in both if t.kind == "experts"]) == 2
    with pytest.raises(ValueError, match="`target_parameters` name 'nothing' matches no parameter"):
        lf.targets(model, lf.LoRAConfig(r=2, target_parameters=("nothing",)))
    with pytest.raises(ValueError, match=r"DoRAConfig cannot adapt 'model.layers.0.mlp.experts.gate_up_proj'"):
        lf.targets(model, lf.DoRAConfig(r=2, target_names=(), target_parameters=("gate_up_proj",)))
    with pytest.raises(ValueError, match=r"`dropout`=0.1 cannot apply to .*fused experts"):
        lf.init(model, lf.LoRAConfig(r=2, dropout=0.1, target_names=(), target_parameters=("gate_up_proj",)))
    with pytest.raises(ValueError, match=r"of shape \(4, 32\).*3-D expert parameters"):
        lf.targets(model, lf.LoRAConfig(r=2, target_parameters=("mlp.gate.weight",)))
    params = lf.stack([lf.init(model, lf.LoRAConfig(r=2, target_names=(), target_parameters=("down_proj",)))] * 2)
    with pytest.raises(ValueError, match=r"`adapter_ids` mixes adapters per row, but .*replacing its parameters"):
        lf.apply(model, params, qwen3_batch(), adapter_ids=[0, 1])


def test_experts_under_gradient_checkpointing_give_the_same_gradients():
    model = tiny_qwen3_moe()
    params = perturbed(lf.init(model, lf.LoRAConfig(r=2, target_parameters=EXPERTS), seed=0), scale=0.3)
    batch = qwen3_batch()
    lf.apply(model, params, batch).loss.backward()
    reference = {(p, k): t.grad.clone() for p, k, t in params.leaves()}
    for reentrant in (False, True):
        for _, _, t in params.leaves():
            t.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        before = snapshot(model)
        lf.apply(model, params, batch).loss.backward()
        assert_untouched(model, before)
        for p, k, t in params.leaves():
            torch.testing.assert_close(t.grad, reference[(p, k)], rtol=1e-5, atol=1e-7, msg=f"{reentrant} {p}.{k}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_disable()


# ---- a target's file form ----------------------------------------------------------------------------------------


def test_targets_round_trip_through_json_and_bad_rows_name_the_field():
    import json

    from components import tiny_bert_classifier

    from lora_func.kinds import target_from_json, target_to_json

    found = [
        *lf.targets(tiny_cnn(), lf.LoRAConfig(r=2, target_names=("^stem$", "^conv$", "^dilated$", "^head$"))),
        *lf.targets(tiny_qwen3_moe(), lf.LoRAConfig(r=2, target_names=(), target_parameters=EXPERTS)),
        *lf.targets(tiny_qwen3(), lf.LoRAConfig(r=2, target_names=("embed_tokens",), exclude_names=())),
        *lf.targets(tiny_gpt2(), lf.LoRAConfig(r=2, layers=(0,))),
        *lf.targets(tiny_bert_classifier(), lf.LoRAConfig(r=2, target_names=(), modules_to_save=("classifier",))),
        *lf.targets(tiny_bert_classifier(), lf.LNTuningConfig(target_names=(r"LayerNorm$",))),
        *lf.targets(tiny_qwen3(), lf.ReFTConfig(r=2, layers=(1,))),
    ]
    assert {t.kind for t in found} == set(KINDS)
    for target in found:
        assert target_from_json(json.loads(json.dumps(target_to_json(target))), "here") == target
    conv = target_to_json(found[0])
    cases = [
        ({"kind": "lstm"}, r"target 'stem': field `kind` must be one of"),
        ({"d_in": -1}, r"field `d_in` must be an int >= 1"),
        ({"roles": ["boss"]}, r"field `roles` must be one of"),
        ({"layout": {**conv["layout"], "stride": "2"}}, r"field `layout`: `stride` must be a list of ints"),
        ({"layout": {k: v for k, v in conv["layout"].items() if k != "groups"}}, r"`layout` must hold exactly"),
        ({"extra": 1}, r"unknown fields \['extra'\]"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            target_from_json({**conv, **change}, "here")
