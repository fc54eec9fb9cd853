"""AdaLoRA against its dense formula and against PEFT's AdaLoRA: outputs and gradients given the same leaves, the
orthogonality term, files both ways (with the `rank_pattern` PEFT saves after its allocator ran), and whole training
runs with the rank allocator, where lora_func and PEFT must remove the same ranks at the same steps. Also: training
on without `lf.schedule` is refused, in both training styles."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from components import cnn_batch, qwen3_batch, tiny_cnn, tiny_gpt2, tiny_qwen3
from conftest import tiny_qwen3_8bit
from peft_parity import (
    PROJECTIONS,
    assert_convolutions_match_peft,
    assert_peft_files_round_trip,
    assert_same_as_peft,
    peft_layer,
    peft_twin,
    twins,
)

import lora_func as lf

peft = pytest.importorskip("peft")

# lora_func fields, as PEFT's AdaLoraConfig takes them (plus PEFT's required `total_step`).
CASES = {
    "default": {},
    "init_r 4, alpha 16": {"init_r": 4, "alpha": 16.0},
}


def _peft_fields(fields, **more):
    out = {("lora_alpha" if k == "alpha" else k): v for k, v in fields.items()}
    return {"total_step": 10, "target_r": 2, **out, **more}


def _peft_leaf(layer, leaf):
    return getattr(layer, leaf)["default"]


def _draw(path, leaf, tensor, gen):
    return 0.2 * torch.randn(tensor.shape, generator=gen)


def test_dense_formula_and_identity_at_init():
    """ΔW = α B (A ⊙ E) / (init_r + 1e-5), in float64 from the leaves; exactly the base model at init (E = 0)."""
    model = tiny_qwen3().eval()
    cfg = lf.AdaLoRAConfig(init_r=5, alpha=3.0)
    params = lf.init(model, cfg, seed=0)
    batch = qwen3_batch()
    with torch.no_grad():
        assert torch.equal(lf.apply(model, params, batch).logits, model(**batch).logits)
    params = lf.combine(*_perturbed_with_mask(params))
    for key, dw in lf.delta_weights(model, params).items():
        leaves = {k: v.detach().double() for k, v in params[key.removesuffix(".weight")].items()}
        mask = leaves["rank_mask"]
        want = 3.0 * leaves["lora_B"] @ (leaves["lora_A"] * leaves["lora_E"] * mask) / (5 + 1e-5)
        torch.testing.assert_close(dw.double(), want, rtol=1e-5, atol=1e-7)
    merged = lf.merge(model, params)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.func.functional_call(model, merged, (batch["input_ids"],)).logits,
            lf.apply(model, params, batch).logits,
            rtol=1e-5,
            atol=1e-5,
        )


def _perturbed_with_mask(params):
    """Trainable leaves drawn N(0, 0.2²), and rank 1 of every target removed in `rank_mask`."""
    gen = torch.Generator().manual_seed(2)
    trainable, frozen = lf.split(params)
    moved = {p: {k: 0.2 * torch.randn(v.shape, generator=gen) for k, v in e.items()} for p, e in trainable.items()}
    masks = {p: {"rank_mask": e["rank_mask"].clone().index_fill_(0, torch.tensor([1]), 0.0)} for p, e in frozen.items()}
    return trainable.replace(moved), frozen.replace(masks)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft_outputs_and_gradients(case):
    model, params, peft_model = peft_twin(
        lf.AdaLoRAConfig(**CASES[case], target_names=PROJECTIONS),
        peft.AdaLoraConfig(**_peft_fields(CASES[case]), target_modules=list(PROJECTIONS)),
        _draw,
        _peft_leaf,
    )
    assert len(params.targets) == sum(hasattr(m, "lora_E") for m in peft_model.modules()) == 14
    worst = assert_same_as_peft(model, params, peft_model, _peft_leaf, atol=1e-5)
    assert worst["logits"] <= 1e-5 and worst["grad"] <= 1e-5


QUANTIZED = {4: ("is_loaded_in_4bit", "SVDLinear4bit"), 8: ("is_loaded_in_8bit", "SVDLinear8bitLt")}


@pytest.mark.parametrize("bits", [pytest.param(4, marks=pytest.mark.slow), 8])
def test_matches_peft_on_a_quantized_base(bits):
    """PEFT's AdaLoRA wraps bitsandbytes' Linear4bit (`SVDLinear4bit`) and Linear8bitLt (`SVDLinear8bitLt`): the
    same base, leaves, step."""
    model, twin = twins(bits=4) if bits == 4 else (tiny_qwen3_8bit(), tiny_qwen3_8bit())
    flag, layer = QUANTIZED[bits]
    setattr(twin, flag, True)  # as from_pretrained's quantization sets it: PEFT picks its bitsandbytes layer
    model, params, peft_model = peft_twin(
        lf.AdaLoRAConfig(init_r=4, target_names=PROJECTIONS),
        peft.AdaLoraConfig(**_peft_fields({"init_r": 4}), target_modules=list(PROJECTIONS)),
        _draw,
        _peft_leaf,
        model=model,
        twin=twin,
    )
    assert type(peft_layer(peft_model, params.targets[0].path)).__name__ == layer
    worst = assert_same_as_peft(model, params, peft_model, _peft_leaf)
    assert worst["logits"] <= 1e-5 and worst["grad"] <= 1e-5


def test_matches_peft_on_conv1d_layers(tmp_path):
    """GPT-2's transformers Conv1D (PEFT's `fan_in_fan_out=True`): same outputs, gradients, merge and files."""
    targets = ["c_attn", "c_proj", "c_fc"]
    model, params, peft_model = peft_twin(
        lf.AdaLoRAConfig(init_r=4, target_names=tuple(rf"\.{t}$" for t in targets)),
        peft.AdaLoraConfig(**_peft_fields({"init_r": 4}), target_modules=targets, fan_in_fan_out=True),
        _draw,
        _peft_leaf,
        model=tiny_gpt2(),
        twin=tiny_gpt2(),
    )
    assert len(params.targets) == 8
    assert_same_as_peft(model, params, peft_model, _peft_leaf)
    model.eval(), peft_model.eval()
    batch = qwen3_batch()
    lf.to_peft(params, tmp_path, model=model)
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2().eval(), tmp_path)
    with torch.no_grad():
        ref = peft_model(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(lf.apply(model, lf.from_peft(tmp_path, model), batch).logits, ref, rtol=0, atol=1e-5)
        merged = torch.func.functional_call(model, lf.merge(model, params), (batch["input_ids"],)).logits
        torch.testing.assert_close(merged, ref, rtol=1e-5, atol=1e-5)
        peft_model.merge_adapter()  # PEFT's own merge (its `get_delta_weight`, transposed for Conv1D)
        torch.testing.assert_close(merged, peft_model(**batch).logits, rtol=1e-5, atol=1e-5)


def test_regularizer_is_peft_orthogonality_term():
    """lf.regularizer is what AdaLoraModel.forward adds to the loss: the losses and their gradients agree."""
    model, params, peft_model = peft_twin(
        lf.AdaLoRAConfig(init_r=4, orth_reg_weight=0.3, target_names=PROJECTIONS),
        peft.AdaLoraConfig(**_peft_fields({"init_r": 4, "orth_reg_weight": 0.3}), target_modules=list(PROJECTIONS)),
        _draw,
        _peft_leaf,
    )
    batch = qwen3_batch()
    plain = lf.apply(model, params, batch).loss
    ours = plain + lf.regularizer(params)
    theirs = peft_model.base_model(**batch).loss  # AdaLoraModel.forward: the loss with its orthogonality term
    assert (ours - plain).item() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    ours.backward()
    theirs.backward()
    for path, leaf, tensor in lf.split(params)[0].leaves():
        expected = _peft_leaf(peft_layer(peft_model, path), leaf).grad
        torch.testing.assert_close(tensor.grad, expected, rtol=1e-4, atol=1e-6, msg=f"{path}.{leaf}")
    # the term itself, from its definition
    want = sum(
        torch.linalg.matrix_norm(P - torch.eye(P.shape[0]))
        for e in params.values()
        for P in (e["lora_A"] @ e["lora_A"].T, e["lora_B"].T @ e["lora_B"])
    ) / (2 * len(params.targets))
    torch.testing.assert_close(lf.regularizer(params), 0.3 * want, rtol=1e-6, atol=1e-6)


# -- training with the rank allocator ----------------------------------------------------------------------------

SCHEDULE = {"init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 12}
STEPS = 15  # through the final allocation (step 9) and into the final phase


def _removed(masks_of_E: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {path: torch.nonzero(E.view(-1) == 0).view(-1).tolist() for path, E in masks_of_E.items()}


def _train_both(torch_func: bool = False):
    """lora_func and PEFT trained from the same adapter on the same batches, each with its allocator; returns the
    removed ranks per step of each, the final logits of each, and both adapters."""
    model, params, peft_model = peft_twin(
        lf.AdaLoRAConfig(**SCHEDULE, target_names=PROJECTIONS),
        peft.AdaLoraConfig(**SCHEDULE, target_modules=list(PROJECTIONS)),
        lambda path, leaf, t, gen: t + (0.05 * torch.randn(t.shape, generator=gen) if leaf == "lora_E" else 0),
        _peft_leaf,
    )
    paths = [t.path for t in params.targets]
    ours_opt = None if torch_func else torch.optim.AdamW(lf.trainable_leaves(params), lr=2e-2)
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    theirs_opt = torch.optim.SGD(trained, lr=2e-2) if torch_func else torch.optim.AdamW(trained, lr=2e-2)
    state = lf.schedule_state(params)
    trainable, frozen = lf.split(params)
    history = {"ours": [], "theirs": []}

    def loss_fn(trainable, batch):
        p = lf.combine(trainable, frozen)
        return lf.apply(model, p, batch).loss + lf.regularizer(p)

    for step in range(STEPS):
        batch = qwen3_batch(seed=100 + step)
        if torch_func:  # SGD in the torch.func style on our side, the same SGD by torch.optim.SGD on PEFT's
            grads = torch.func.grad(loss_fn)(trainable, batch)
            trainable = trainable.replace(
                {p: {k: torch.add(v, grads[p][k], alpha=-2e-2) for k, v in e.items()} for p, e in trainable.items()}
            )
            params, state = lf.schedule(lf.combine(trainable, frozen), state, step, grads=grads)
            trainable, frozen = lf.split(params)
        else:
            loss = lf.apply(model, params, batch).loss + lf.regularizer(params)
            loss.backward()
            ours_opt.step()
            params, state = lf.schedule(params, state, step)
            ours_opt.zero_grad()
        theirs = peft_model.base_model(**batch).loss
        theirs.backward()
        theirs_opt.step()
        peft_model.base_model.update_and_allocate(step)
        theirs_opt.zero_grad()
        history["ours"].append(_removed({p: params[p]["lora_E"].detach() for p in paths}))
        history["theirs"].append(_removed({p: _peft_leaf(peft_layer(peft_model, p), "lora_E") for p in paths}))
    with torch.no_grad():
        batch = qwen3_batch(seed=7)
        logits = (lf.apply(model, params, batch).logits, peft_model(**batch).logits)
    return history, logits, params, peft_model


@pytest.fixture(scope="module")
def trained():
    return _train_both()


@pytest.mark.slow
def test_trained_with_the_allocator_removes_peft_ranks_and_gives_peft_logits(trained):
    history, (ours, theirs), params, peft_model = trained
    assert history["ours"] == history["theirs"]
    changed = [s for s in range(1, STEPS) if history["ours"][s] != history["ours"][s - 1]]
    assert len(changed) >= 2, f"the allocation changed at steps {changed} only"
    total = sum(len(r) for r in history["ours"][-1].values())
    assert total == (6 - 2) * 14, "the final budget is target_r ranks per target on average"
    final = peft_model.peft_config["default"].rank_pattern
    for target in params.targets:
        kept = (params[target.path]["rank_mask"].view(-1) == 1).tolist()
        assert kept == final[f"{target.path}.lora_E.default"]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_torch_func_style_allocates_as_peft():
    """The same run with SGD: `torch.func.grad` and `grads=` on lora_func's side, torch.optim.SGD on PEFT's."""
    history, (ours, theirs), _, _ = _train_both(torch_func=True)
    assert history["ours"] == history["theirs"]
    assert sum(len(r) for r in history["ours"][-1].values()) == (6 - 2) * 14
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_peft_trained_file_round_trips_with_its_rank_pattern(trained, tmp_path):
    """PEFT saves the kept ranks only and the final `rank_pattern`: `from_peft` gives PEFT's logits, and `to_peft` of
    what it read writes the same tensors and pattern again, which PEFT loads to the same logits. lora_func's own
    trained adapter, written by `to_peft`, is what PEFT saved, to rounding."""
    from safetensors.torch import load_file

    _, _, params, peft_model = trained
    with warnings.catch_warnings():  # PEFT takes a target whose every rank was removed for an ungathered shard
        warnings.filterwarnings("ignore", r".*LoRA tensor\(s\) have invalid shape", peft.utils.warning.PeftWarning)
        peft_model.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert min(t.shape[0] for k, t in saved.items() if k.endswith("lora_E")) < SCHEDULE["init_r"]
    model = twins()[0].eval()
    batch = qwen3_batch(seed=7)
    peft_model.eval()
    with torch.no_grad():
        want = peft_model(**batch).logits
        back = lf.from_peft(tmp_path / "peft", model)
        torch.testing.assert_close(lf.apply(model, back, batch).logits, want, rtol=0, atol=1e-5)
    lf.to_peft(back, tmp_path / "again", model=model)
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
    config = lambda d: json.loads((tmp_path / d / "adapter_config.json").read_text())  # noqa: E731
    assert config("again")["rank_pattern"] == config("peft")["rank_pattern"]
    with warnings.catch_warnings():  # PEFT reads AdaLoRA's `rank_pattern` as LoRA's (per-module ranks) to warn
        warnings.filterwarnings("ignore", "The following rank_pattern keys did not match", RuntimeWarning)
        loaded = peft.PeftModel.from_pretrained(twins()[1].eval(), tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want, rtol=0, atol=1e-5)

    lf.to_peft(params, tmp_path / "ours", model=model)
    assert config("ours")["rank_pattern"] == config("peft")["rank_pattern"]
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    for key in saved:
        torch.testing.assert_close(ours[key], saved[key], rtol=0, atol=1e-5)


def test_untrained_file_round_trips(tmp_path):
    cfg = peft.AdaLoraConfig(**_peft_fields({"init_r": 4}), target_modules=["q_proj", "v_proj", "down_proj"])
    params = assert_peft_files_round_trip(tmp_path, cfg, "lora_", 0.1)
    got = params.config
    assert (got.init_r, got.target_r, got.total_step, got.alpha) == (4, 2, 10, 8.0)
    assert all(bool((e["rank_mask"] == 1).all()) for e in params.values())


def test_a_rank_pattern_that_does_not_match_the_tensors_is_refused(tmp_path):
    model = twins()[0].eval()
    params = lf.init(model, lf.AdaLoRAConfig(init_r=4, total_step=10, target_r=2, target_names=("q_proj$",)), seed=0)
    lf.to_peft(params, tmp_path, model=model)
    path = tmp_path / "adapter_config.json"
    fields = json.loads(path.read_text())
    fields["rank_pattern"] = {f"{t.path}.lora_E": [True, False, True, True] for t in params.targets}
    path.write_text(json.dumps(fields))
    with pytest.raises(lf.AdapterFileError, match=r"lora_A holds 4 ranks, and `rank_pattern` keeps 3 of 4"):
        lf.from_peft(tmp_path, model)
    fields["rank_pattern"] = {f"{t.path}.lora_E": [True, False] for t in params.targets}
    path.write_text(json.dumps(fields))
    with pytest.raises(lf.AdapterFileError, match=r"must be 4 booleans \(`init_r`\)"):
        lf.from_peft(tmp_path, model)


# -- convolutions (PEFT's `SVDConv2d`) -----------------------------------------------------------------------------

CONV_TARGETS = ["stem", "conv", "down", "pointwise"]  # tiny_cnn's groups-1, zero-padded convolutions: PEFT's too
ALL_CONVS = r"^(stem|conv|mix|down|dilated|pointwise)$"  # + grouped `mix`, dilated reflect-padded `dilated`


def test_convolutions_match_peft_outputs_gradients_and_files(tmp_path):
    """nn.Conv2d targets (3×3 plain, "same", strided; 1×1): PEFT's `SVDConv2d` given the same leaves, and files
    written by `to_peft` loading in PEFT and read back by `from_peft`, all giving PEFT's outputs."""
    cfg = lf.AdaLoRAConfig(init_r=4, alpha=6.0, target_names=(rf"^({'|'.join(CONV_TARGETS)})$",))
    peft_cfg = peft.AdaLoraConfig(**_peft_fields({"init_r": 4, "alpha": 6.0}), target_modules=CONV_TARGETS)
    worst = assert_convolutions_match_peft(tmp_path, cfg, peft_cfg, _draw, _peft_leaf)
    assert worst["outputs"] <= 1e-5 and worst["grad"] <= 1e-5


def test_dilated_convolutions_match_peft_and_files_load_in_peft(tmp_path):
    """PEFT's `SVDConv2d` convolves ΔW with the layer's dilation (zero padding): dilated targets are exchanged."""

    def build():
        torch.manual_seed(0)
        conv = torch.nn.Conv2d
        return torch.nn.Sequential(
            conv(3, 6, 3, padding=2, dilation=2), torch.nn.ReLU(), conv(6, 4, 3, dilation=(1, 2))
        )

    model, params, peft_model = peft_twin(
        lf.AdaLoRAConfig(init_r=4, target_names=("^(0|2)$",)),
        peft.AdaLoraConfig(**_peft_fields({"init_r": 4}), target_modules=["0", "2"]),
        _draw,
        _peft_leaf,
        model=build(),
        twin=build(),
    )
    x = cnn_batch()
    out, ref = lf.apply(model, params, x), peft_model(x)
    assert not torch.allclose(out, model(x), atol=1e-3)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    out.square().mean().backward()
    ref.square().mean().backward()
    for path, leaf, tensor in lf.split(params)[0].leaves():
        expected = _peft_leaf(peft_layer(peft_model, path), leaf).grad
        torch.testing.assert_close(tensor.grad, expected, rtol=1e-4, atol=1e-6, msg=f"{path}.{leaf}")
    lf.to_peft(params, tmp_path, model=model)
    loaded = peft.PeftModel.from_pretrained(build().eval(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(lf.apply(model, lf.from_peft(tmp_path, model), x), ref, rtol=0, atol=1e-5)


def test_convolution_dense_formula_merge_and_identity_at_init():
    """On every convolution (grouped and dilated reflect-padded ones too, which PEFT cannot take): the base model at
    init; then ΔW = α B (A ⊙ E ⊙ m) / (init_r + 1e-5) as the layer's flattened kernel (d_out, d_in / groups · ∏kernel),
    and lf.apply and lf.merge both give the model whose weights are W + ΔW, computed here from the leaves (merged
    weights equal to those). `lf.delta_weights` covers nn.Linear-style targets only (adapter arithmetic)."""
    model = tiny_cnn().eval()
    params = lf.init(model, lf.AdaLoRAConfig(init_r=4, alpha=6.0, target_names=(ALL_CONVS,)), seed=0)
    x = cnn_batch()
    with torch.no_grad():
        assert torch.equal(lf.apply(model, params, x), model(x))
    params = lf.combine(*_perturbed_with_mask(params))
    assert len(params.targets) == 6
    dense = {}
    for target in params.targets:
        f = {k: v.detach().double() for k, v in params[target.path].items()}
        weight = model.get_submodule(target.path).weight
        dw = 6.0 * f["lora_B"] @ (f["lora_A"] * f["lora_E"] * f["rank_mask"]) / (4 + 1e-5)
        dense[f"{target.path}.weight"] = (weight.double() + dw.reshape(weight.shape)).float()
    with torch.no_grad():
        ref = torch.func.functional_call(model, dense, (x,))
        assert not torch.allclose(ref, model(x), atol=1e-3)
        torch.testing.assert_close(lf.apply(model, params, x), ref, rtol=0, atol=1e-5)
        merged = lf.merge(model, params)
        for key, weight in dense.items():
            torch.testing.assert_close(merged[key], weight, rtol=0, atol=1e-6, msg=key)
        torch.testing.assert_close(torch.func.functional_call(model, merged, (x,)), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d_follow_the_dense_formula(dims):
    """nn.Conv1d / nn.Conv3d (which PEFT's AdaLoRA lacks): lf.apply is the model with W + ΔW, ΔW from the leaves."""
    conv = {1: torch.nn.Conv1d, 3: torch.nn.Conv3d}[dims]
    torch.manual_seed(0)
    model = torch.nn.Sequential(conv(3, 6, 3, padding=1), torch.nn.ReLU(), conv(6, 4, 2, stride=2, groups=2)).eval()
    params = lf.combine(*_perturbed_with_mask(lf.init(model, lf.AdaLoRAConfig(init_r=3, target_names=("^(0|2)$",)))))
    dense = {}
    for path in ("0", "2"):
        f, weight = params[path], model.get_submodule(path).weight
        dw = 8.0 * f["lora_B"] @ (f["lora_A"] * f["lora_E"] * f["rank_mask"]) / (3 + 1e-5)
        dense[f"{path}.weight"] = weight + dw.detach().reshape(weight.shape)
    x = torch.randn(2, 3, *(6,) * dims, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch.func.functional_call(model, dense, (x,))
        assert not torch.allclose(ref, model(x), atol=1e-3)
        torch.testing.assert_close(lf.apply(model, params, x), ref, rtol=0, atol=1e-5)


def test_convolutions_peft_computes_otherwise_are_refused(tmp_path):
    """PEFT's `SVDConv2d` fails on groups > 1 (its A has d_in · kh · kw columns: B A does not reshape to a grouped
    kernel) and convolves ΔW over a zero-padded input on a reflect-padded layer: `to_peft` refuses both."""
    model = tiny_cnn().eval()
    for name, error in (("mix", r"'mix' \(Conv2d\) has groups=2; PEFT's AdaLoRA `SVDConv2d`"), ("dilated", "pads")):
        params = lf.init(model, lf.AdaLoRAConfig(init_r=4, target_names=(rf"^{name}$",)), seed=0)
        with pytest.raises(ValueError, match=error):
            lf.to_peft(params, tmp_path / name, model=model)
        assert not (tmp_path / name).exists()
    conv1d = torch.nn.Sequential(torch.nn.Conv1d(3, 8, 3))
    params = lf.init(conv1d, lf.AdaLoRAConfig(init_r=4, target_names=("^0$",)), seed=0)
    with pytest.raises(ValueError, match="nn.Conv1d, which PEFT's ADALORA does not adapt"):
        lf.to_peft(params, tmp_path / "conv1d", model=conv1d)


def _train_cnn_both():
    """The rank-allocator run of `_train_both` on tiny_cnn's convolutions (cross-entropy on random labels, no
    orthogonality term: PEFT adds it only to a model output with a `loss`)."""
    model, params, peft_model = peft_twin(
        lf.AdaLoRAConfig(**SCHEDULE, target_names=(rf"^({'|'.join(CONV_TARGETS)})$",)),
        peft.AdaLoraConfig(**SCHEDULE, target_modules=CONV_TARGETS),
        lambda path, leaf, t, gen: t + (0.05 * torch.randn(t.shape, generator=gen) if leaf == "lora_E" else 0),
        _peft_leaf,
        model=tiny_cnn(),
        twin=tiny_cnn(),
    )
    paths = [t.path for t in params.targets]
    ours_opt = torch.optim.AdamW(lf.trainable_leaves(params), lr=2e-2)
    theirs_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    state = lf.schedule_state(params)
    history = {"ours": [], "theirs": []}
    for step in range(STEPS):
        x = cnn_batch(seed=100 + step)
        labels = torch.randint(0, 5, (x.shape[0],), generator=torch.Generator().manual_seed(step))
        F.cross_entropy(lf.apply(model, params, x), labels).backward()
        ours_opt.step()
        params, state = lf.schedule(params, state, step)
        ours_opt.zero_grad()
        F.cross_entropy(peft_model(x), labels).backward()
        theirs_opt.step()
        peft_model.base_model.update_and_allocate(step)
        theirs_opt.zero_grad()
        history["ours"].append(_removed({p: params[p]["lora_E"].detach() for p in paths}))
        history["theirs"].append(_removed({p: _peft_leaf(peft_layer(peft_model, p), "lora_E") for p in paths}))
    model.eval(), peft_model.eval()
    return model, history, params, peft_model


@pytest.mark.slow
def test_allocator_on_convolutions_removes_peft_ranks_and_files_round_trip(tmp_path):
    """Trained with the allocator on convolutions, lora_func and PEFT remove the same ranks at the same steps and
    give the same outputs; PEFT's saved adapter (kept ranks, `rank_pattern`) read by `from_peft` gives PEFT's
    outputs, and `to_peft` of it writes PEFT's tensors and pattern again, which PEFT loads to the same outputs."""
    from safetensors.torch import load_file

    model, history, params, peft_model = _train_cnn_both()
    assert history["ours"] == history["theirs"]
    assert len({json.dumps(h) for h in history["ours"]}) >= 3, "the allocation never changed"
    assert sum(len(r) for r in history["ours"][-1].values()) == (6 - 2) * len(CONV_TARGETS)
    final = peft_model.peft_config["default"].rank_pattern
    for target in params.targets:
        assert (params[target.path]["rank_mask"].view(-1) == 1).tolist() == final[f"{target.path}.lora_E.default"]
    x = cnn_batch(seed=7)
    with torch.no_grad():
        want = peft_model(x)
        assert not torch.allclose(want, model(x), atol=1e-4)
        torch.testing.assert_close(lf.apply(model, params, x), want, rtol=0, atol=1e-5)

    with warnings.catch_warnings():  # PEFT takes a target whose every rank was removed for an ungathered shard
        warnings.filterwarnings("ignore", r".*LoRA tensor\(s\) have invalid shape", peft.utils.warning.PeftWarning)
        peft_model.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert min(t.shape[0] for k, t in saved.items() if k.endswith("lora_E")) < SCHEDULE["init_r"]
    back = lf.from_peft(tmp_path / "peft", model)
    with torch.no_grad():
        torch.testing.assert_close(lf.apply(model, back, x), want, rtol=0, atol=1e-5)
    lf.to_peft(back, tmp_path / "again", model=model)
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
    with warnings.catch_warnings():  # PEFT reads AdaLoRA's `rank_pattern` as LoRA's (per-module ranks) to warn
        warnings.filterwarnings("ignore", "The following rank_pattern keys did not match", RuntimeWarning)
        loaded = peft.PeftModel.from_pretrained(tiny_cnn().eval(), tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=1e-5)


# -- config --------------------------------------------------------------------------------------------------------


def test_config_defaults_and_refusals_are_peft_s():
    peft_cfg = peft.AdaLoraConfig(total_step=10)
    cfg = lf.AdaLoRAConfig()
    for name in ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight"):
        assert getattr(cfg, name) == getattr(peft_cfg, name), name
    assert (cfg.r, cfg.alpha, cfg.total_step) == (12, peft_cfg.lora_alpha, None)
    assert lf.AdaLoRAConfig(r=4).init_r == 4 and lf.AdaLoRAConfig(init_r=5).r == 5
    with pytest.raises(ValueError, match="`r`=4 and `init_r`=6 differ"):
        lf.AdaLoRAConfig(r=4, init_r=6)
    with pytest.raises(ValueError, match="no budgeting phase is left"):
        lf.AdaLoRAConfig(tinit=5, tfinal=5, total_step=10)
    high = lf.init(tiny_qwen3(), lf.AdaLoRAConfig(target_r=12, total_step=10, target_names=("q_proj$",)), seed=0)
    with pytest.raises(ValueError, match="`target_r`=12 must be below `init_r`=12"):
        lf.schedule_state(high)
    with pytest.raises(ValueError, match="`beta1` and `beta2` must be in"):
        lf.AdaLoRAConfig(beta1=1.0)
    with pytest.raises(ValueError, match="`rank_pattern` / `alpha_pattern` are not supported"):
        lf.AdaLoRAConfig(rank_pattern={"q_proj": 2})


# -- forgetting the allocator --------------------------------------------------------------------------------------


def _loop_without_schedule(params, model, steps, *, schedule_state=True):
    optimizer = torch.optim.AdamW(lf.trainable_leaves(params), lr=1e-2)
    if schedule_state:
        lf.schedule_state(params)
    for step in range(steps):
        lf.apply(model, params, qwen3_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_training_on_without_the_allocator_is_refused():
    """With `total_step` set, the second training call after an optimizer step that `lf.schedule` did not see raises,
    naming lf.schedule; so does a training call on leaves never given to `lf.schedule_state`. Evaluation (no grad)
    and `total_step=None` (a fixed rank, no allocator) are not checked."""
    model = tiny_qwen3()
    cfg = lf.AdaLoRAConfig(init_r=4, target_r=2, total_step=20, target_names=("q_proj$",))
    params = lf.init(model, cfg, seed=0)
    with pytest.raises(RuntimeError, match=r"apply: AdaLoRA with `total_step`=20 .* never given to lf.schedule_state"):
        lf.apply(model, params, qwen3_batch())
    with pytest.raises(RuntimeError, match=r"an optimizer step changed them after lf.schedule last ran.*lf.schedule\("):
        _loop_without_schedule(params, model, 2)
    with torch.no_grad():
        lf.apply(model, params, qwen3_batch())
    with pytest.raises(RuntimeError, match="lf.schedule"), lf.inject(model, params):
        pass
    # the same loop with the allocator runs
    params = lf.init(model, cfg, seed=0)
    optimizer = torch.optim.AdamW(lf.trainable_leaves(params), lr=1e-2)
    state = lf.schedule_state(params)
    for step in range(3):
        for micro in range(2):  # gradient accumulation: several calls per optimizer step
            lf.apply(model, params, qwen3_batch(seed=10 * step + micro)).loss.backward()
        optimizer.step()
        params, state = lf.schedule(params, state, step)
        optimizer.zero_grad()
    fixed = lf.init(model, dataclasses.replace(cfg, total_step=None), seed=0)
    _loop_without_schedule(fixed, model, 3, schedule_state=False)


def test_an_adapter_never_scheduled_evaluates_with_grad_in_eval_mode_and_fails_once_trained():
    """A loaded adapter (never given to the allocator) runs with grad enabled on a model in eval mode (gradients for
    analysis); once an optimizer step changes it without lf.schedule, the next call raises, in eval mode too."""
    model = tiny_qwen3().eval()
    cfg = lf.AdaLoRAConfig(init_r=4, target_r=2, total_step=20, target_names=("q_proj$",))
    params = lf.init(model, cfg, seed=0)
    for _ in range(2):
        lf.apply(model, params, qwen3_batch()).loss.backward()
    with pytest.raises(RuntimeError, match="an optimizer step changed them, and lf.schedule never ran"):
        _loop_without_schedule(params, model, 2, schedule_state=False)


def test_torch_func_training_on_without_the_allocator_is_refused():
    model = tiny_qwen3()
    cfg = lf.AdaLoRAConfig(init_r=4, target_r=2, total_step=20, target_names=("q_proj$",))
    params = lf.init(model, cfg, seed=0)
    state = lf.schedule_state(params)
    trainable, frozen = lf.split(params)

    def loss_fn(trainable):
        return lf.apply(model, lf.combine(trainable, frozen), qwen3_batch()).loss

    grads = torch.func.grad(loss_fn)(trainable)
    trainable = trainable.replace({p: {k: v - 0.1 * grads[p][k] for k, v in e.items()} for p, e in trainable.items()})
    with pytest.raises(RuntimeError, match="never given to lf.schedule_state or lf.schedule"):
        torch.func.grad(loss_fn)(trainable)
    params, state = lf.schedule(lf.combine(trainable, frozen), state, 0, grads=grads)
    torch.func.grad(loss_fn)(lf.split(params)[0])


def test_schedule_misuse_is_refused():
    model = tiny_qwen3()
    params = lf.init(model, lf.AdaLoRAConfig(init_r=4, target_names=("q_proj$",)), seed=0)
    with pytest.raises(ValueError, match="`total_step=None`, so no rank allocator"):
        lf.schedule(params, lf.schedule_state(params), 0)
    params = lf.init(model, lf.AdaLoRAConfig(init_r=4, target_r=2, total_step=9, target_names=("q_proj$",)), seed=0)
    state = lf.schedule_state(params)
    with pytest.raises(ValueError, match=r"no gradient for .*lora_A: call lf.schedule after backward\(\)"):
        lf.schedule(params, state, 0)
    lf.apply(model, params, qwen3_batch()).loss.backward()
    params, state = lf.schedule(params, state, 0)
    with pytest.raises(ValueError, match="step 0 after step 0: call it once per optimizer step"):
        lf.schedule(params, state, 0)
