"""`lf.to_peft` / `lf.from_peft` against Hugging Face PEFT itself, on the tiny Qwen3 (fp32) and the MiniLM.

Both directions compare logits with PEFT's own model; round trips compare leaves bitwise; every refused
PEFT field is an error that names it.
"""

from __future__ import annotations

import json
import os
from functools import partial

import conftest
import pytest
import torch
from conftest import assert_untouched, minilm, qwen3_batch, snapshot, tiny_qwen3, tiny_qwen3_4bit
from peft_parity import PROJECTIONS
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_func as lf
from lora_func import peft as _peft
from lora_func.variants import variant_for

peft = pytest.importorskip("peft")


# Leaves moved twice as far as elsewhere (B ≠ 0, λ changed), so every adapter moves the logits well past ATOL.
perturbed = partial(conftest.perturbed, scale=0.1)

ATOL = 1e-5  # logits are O(1); float32 reassociation (scale before/after B, W_res vs W − s·B0A0): measured <= 3e-6


def logits(model, params=None, batch=None):
    batch = qwen3_batch() if batch is None else batch
    with torch.no_grad():
        return (lf.apply(model, params, batch) if params is not None else model(**batch)).logits


def read_json(directory) -> dict:
    with open(os.path.join(directory, _peft.CONFIG_NAME)) as f:
        return json.load(f)


def write_json(directory, fields: dict) -> None:
    with open(os.path.join(directory, _peft.CONFIG_NAME), "w") as f:
        json.dump(fields, f)


# ---- lora_func -> PEFT ------------------------------------------------------------------------------------------

EXPORT_CASES = {
    "lora": lambda: lf.LoRAConfig(r=4, alpha=8, target_names=(r"q_proj$", r"v_proj$")),
    "lora-rslora-patterns": lambda: lf.LoRAConfig(
        r=4,
        alpha=8,
        use_rslora=True,
        rank_pattern={"layers.0.self_attn.q_proj": 2, "up_proj": 6},
        alpha_pattern={"v_proj": 3, r"layers\.1\..*_proj": 5.5},
    ),
    "pissa": lambda: lf.PiSSAConfig(r=4, alpha=8, target_names=(r"proj$",)),
    "pissa-rslora-patterns": lambda: lf.PiSSAConfig(
        r=4, alpha=6, use_rslora=True, target_roles=("reader",), rank_pattern={"q_proj": 2}, alpha_pattern={"k_proj": 3}
    ),
    "delora": lambda: lf.DeLoRAConfig(r=4, target_names=(r"mlp",), layers=(1,), rank_pattern={"up_proj": 2}),
    "delora-patterns": lambda: lf.DeLoRAConfig(r=4, alpha=12, alpha_pattern={"o_proj": 3}, exclude_names=("lm_head",)),
    "dora": lambda: lf.DoRAConfig(
        r=4, alpha=8, use_rslora=True, target_names=(r"(q|v|down)_proj$",), rank_pattern={"down_proj": 2}
    ),
    "ia3": lambda: lf.IA3Config(target_names=(r"(k|v|o)_proj$",)),
    "ia3ff": lambda: lf.IA3FFConfig(target_names=(r"_proj$",)),
    "hra": lambda: lf.HRAConfig(r=4, target_names=(r"(q|up)_proj$",)),
    "vera": lambda: lf.VeRAConfig(r=4, d_initial=0.2, projection_prng_key=3, target_names=(r"(q|up|down)_proj$",)),
    "road-1": lambda: lf.ROADConfig(variant="road_1", group_size=16),
    "road-2": lambda: lf.ROADConfig(variant="road_2", group_size=32, target_names=(r"(k|o|gate)_proj$",)),
    "road-4": lambda: lf.ROADConfig(variant="road_4", group_size=8, target_names=(r"(v|up|down)_proj$",), layers=(1,)),
    # group_size=None resolves to 64 on every one of these targets: written as PEFT's int 64.
    "road-none": lambda: lf.ROADConfig(variant="road_4", target_names=(r"(q|o|up)_proj$",)),
}


@pytest.mark.parametrize("with_model", [False, True], ids=["no-model", "model"])
@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_to_peft_loads_in_peft_with_same_logits(case, with_model, tmp_path):
    model = tiny_qwen3().eval()
    params = perturbed(lf.init(model, EXPORT_CASES[case](), seed=0))
    before = snapshot(model)
    lf.to_peft(params, tmp_path, model=model if with_model else None)
    assert_untouched(model, before)
    ours = logits(model, params)

    peft_model = peft.PeftModel.from_pretrained(tiny_qwen3().eval(), tmp_path)
    theirs = logits(peft_model)
    assert (theirs - logits(model)).abs().max() > 1e-2  # the adapter matters, so equality means something
    torch.testing.assert_close(theirs, ours, rtol=0, atol=ATOL)
    assert sorted(peft_model.base_model.targeted_module_names) == sorted(t.path for t in params.targets)


SAVE_CASES = {
    "lora": (
        lambda: peft.LoraConfig(
            r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}
        ),
        lambda: lf.LoRAConfig(
            r=4, alpha=8, use_rslora=True, target_names=(r"\.[qv]_proj$",), rank_pattern={"v_proj": 2}
        ),
    ),
    "delora": (
        lambda: peft.DeloraConfig(r=4, delora_lambda=12, target_modules=["up_proj"], lambda_pattern={"up_proj": 3}),
        lambda: lf.DeLoRAConfig(r=4, alpha=12, target_names=("up_proj",), alpha_pattern={"up_proj": 3}),
    ),
    "dora": (
        lambda: peft.LoraConfig(
            r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj"], alpha_pattern={"k_proj": 2}
        ),
        lambda: lf.DoRAConfig(r=4, alpha=8, target_names=("k_proj",), alpha_pattern={"k_proj": 2}),
    ),
    "ia3": (
        lambda: peft.IA3Config(target_modules=["q_proj", "o_proj"], feedforward_modules=[]),
        lambda: lf.IA3Config(target_names=("[qo]_proj",)),
    ),
    "ia3ff": (
        lambda: peft.IA3Config(target_modules=["up_proj", "down_proj"], feedforward_modules=["up_proj", "down_proj"]),
        lambda: lf.IA3FFConfig(target_names=("up_proj", "down_proj")),
    ),
    "hra": (
        lambda: peft.HRAConfig(r=4, target_modules=["v_proj"]),
        lambda: lf.HRAConfig(r=4, target_names=("v_proj",)),
    ),
    "vera": (
        lambda: peft.VeraConfig(r=4, d_initial=0.2, projection_prng_key=9, target_modules=["q_proj", "up_proj"]),
        lambda: lf.VeRAConfig(r=4, d_initial=0.2, projection_prng_key=9, target_names=("q_proj", "up_proj")),
    ),
    "road": (
        lambda: peft.RoadConfig(variant="road_2", group_size=32, target_modules=["q_proj", "down_proj"]),
        lambda: lf.ROADConfig(variant="road_2", group_size=32, target_names=("q_proj", "down_proj")),
    ),
    "road-default-group": (
        lambda: peft.RoadConfig(target_modules=["o_proj"]),
        lambda: lf.ROADConfig(target_names=("o_proj",)),  # None resolves to 64 on o_proj: PEFT's default
    ),
}


@pytest.mark.parametrize("case", sorted(SAVE_CASES))
def test_to_peft_writes_what_peft_save_pretrained_writes(case, tmp_path):
    """Same tensor keys, shapes and metadata; same config JSON field for field (PEFT adds its version)."""
    peft_cfg, ours_cfg = SAVE_CASES[case]
    peft.get_peft_model(tiny_qwen3(), peft_cfg()).save_pretrained(tmp_path / "peft")
    model = tiny_qwen3()
    lf.to_peft(lf.init(model, ours_cfg(), seed=0), tmp_path / "ours", model=model)

    theirs, ours = read_json(tmp_path / "peft"), read_json(tmp_path / "ours")
    theirs.pop("peft_version")
    for name in ("target_modules", "feedforward_modules"):  # sets in PEFT's config: saved in any order
        if name in theirs:
            theirs[name] = sorted(theirs[name])
    assert ours == theirs
    with (
        safe_open(tmp_path / "peft" / _peft.WEIGHTS_NAME, "pt") as a,
        safe_open(tmp_path / "ours" / _peft.WEIGHTS_NAME, "pt") as b,
    ):
        assert a.metadata() == b.metadata()
        assert {k: a.get_slice(k).get_shape() for k in a.keys()} == {k: b.get_slice(k).get_shape() for k in b.keys()}


def test_to_peft_target_modules_select_exactly_the_targets(tmp_path):
    """Without the model, an exact regex; with it, PEFT's usual short list where that selects the same modules."""
    model = tiny_qwen3()
    params = lf.init(model, lf.LoRAConfig(r=2, target_names=(r"q_proj$", r"up_proj$"), layers=(1,)), seed=0)
    lf.to_peft(params, tmp_path / "a")
    assert read_json(tmp_path / "a")["target_modules"] == r"model\.layers\.1\.(?:mlp\.up_proj|self_attn\.q_proj)"
    lf.to_peft(params, tmp_path / "b", model=model)  # layer 1 only: a name list would also hit layer 0
    assert read_json(tmp_path / "b")["target_modules"] == read_json(tmp_path / "a")["target_modules"]

    params = lf.init(model, lf.LoRAConfig(r=2, target_names=(r"q_proj$", r"up_proj$")), seed=0)
    lf.to_peft(params, tmp_path / "c", model=model)
    assert read_json(tmp_path / "c")["target_modules"] == ["q_proj", "up_proj"]


def test_to_peft_rewrites_patterns_that_sorting_would_reorder(tmp_path):
    """PEFT sorts pattern keys and takes the first match: an order-dependent pattern set becomes exact paths."""
    model = tiny_qwen3().eval()
    cfg = lf.LoRAConfig(
        r=4, target_names=("q_proj$",), rank_pattern=((r"q_proj", 2), (r"layers\.0\.self_attn\.q_proj", 3))
    )
    params = perturbed(lf.init(model, cfg, seed=0))
    lf.to_peft(params, tmp_path)
    assert read_json(tmp_path)["rank_pattern"] == {
        r"model\.layers\.0\.self_attn\.q_proj": 2,
        r"model\.layers\.1\.self_attn\.q_proj": 2,
    }
    peft_model = peft.PeftModel.from_pretrained(tiny_qwen3().eval(), tmp_path)
    torch.testing.assert_close(logits(peft_model), logits(model, params), rtol=0, atol=ATOL)


def test_to_peft_refuses(tmp_path):
    params = lf.init(tiny_qwen3(), lf.LoRAConfig(r=2), seed=0)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="`directory`.*is a file"):
        lf.to_peft(params, tmp_path / "file")
    with pytest.raises(TypeError, match="`params` must be lora_func Params"):
        lf.to_peft({"a": {}}, tmp_path)
    with pytest.raises(
        ValueError,
        match="target 'model.layers.0.self_attn.q_proj' is 32 -> 32 in the model, the adapter holds 64 -> 64",
    ):
        lf.to_peft(params, tmp_path / "x", model=tiny_qwen3(hidden_size=32, head_dim=8))


# ---- PEFT -> lora_func ------------------------------------------------------------------------------------------

IMPORT_CASES = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    "lora-rslora-patterns": lambda: peft.LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules="all-linear",
        rank_pattern={"q_proj": 2, "layers.1.mlp.up_proj": 6},
        alpha_pattern={"^model.layers.0.self_attn.v_proj": 5, "down_proj": 3.5},
    ),
    "lora-regex-exclude": lambda: peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=r".*(self_attn|mlp)\.(k|gate)_proj",
        exclude_modules=["layers.0.mlp.gate_proj"],
    ),
    "pissa": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"], init_lora_weights="pissa"
    ),
    "delora": lambda: peft.DeloraConfig(
        r=4,
        target_modules=["k_proj", "up_proj"],
        layers_to_transform=[1],
        rank_pattern={"up_proj": 2},
        lambda_pattern={"k_proj": 7},
    ),
    "dora": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2}
    ),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "o_proj"], feedforward_modules=[]),
    "ia3ff": lambda: peft.IA3Config(target_modules=list(PROJECTIONS), feedforward_modules=list(PROJECTIONS)),
    "hra": lambda: peft.HRAConfig(r=4, target_modules=["q_proj", "up_proj"], layers_to_transform=[0]),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "up_proj", "down_proj"], projection_prng_key=5),
    "vera-no-projection": lambda: vera_without_projection(),
    # init_weights=False: PEFT's random angles and scales, far from the identity before training.
    "road-1": lambda: peft.RoadConfig(variant="road_1", group_size=16, target_modules="all-linear", init_weights=False),
    "road-2": lambda: peft.RoadConfig(variant="road_2", group_size=32, target_modules=["k_proj", "up_proj"]),
    "road-4": lambda: peft.RoadConfig(
        variant="road_4", group_size=8, target_modules=r".*\.(self_attn\.v|mlp\.down)_proj", init_weights=False
    ),
}


def vera_without_projection():
    with pytest.warns(UserWarning, match="Specified to not save vera_A and vera_B"):
        return peft.VeraConfig(
            r=4, target_modules=["v_proj", "gate_proj"], projection_prng_key=2, save_projection=False
        )


def peft_trained(peft_config, directory, steps: int = 3) -> torch.Tensor:
    """A PEFT adapter trained a few AdamW steps and saved by PEFT; returns PEFT's logits after training."""
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_qwen3(), peft_config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**qwen3_batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(directory)
    return logits(model)


@pytest.mark.parametrize("case", sorted(IMPORT_CASES))
def test_from_peft_gives_peft_logits(case, tmp_path):
    theirs = peft_trained(IMPORT_CASES[case](), tmp_path)
    model = tiny_qwen3().eval()
    before = snapshot(model)
    params = lf.from_peft(tmp_path, model)
    assert_untouched(model, before)
    assert (theirs - logits(model)).abs().max() > 1e-2
    torch.testing.assert_close(logits(model, params), theirs, rtol=0, atol=ATOL)

    variant = "pissa" if case == "pissa" else case.split("-")[0]
    assert variant_for(params.config).name == variant
    trainable, frozen = lf.split(params)
    assert all(t.requires_grad for _, _, t in trainable.leaves())
    assert not any(t.requires_grad for _, _, t in frozen.leaves())


def test_from_peft_pissa_rebuilds_the_initial_factors_as_peft_does(tmp_path):
    """A PEFT PiSSA checkpoint holds the trained A, B only; A0, B0 are the SVD factors lf.init would make."""
    peft_trained(IMPORT_CASES["pissa"](), tmp_path, steps=1)
    model = tiny_qwen3()
    params = lf.from_peft(tmp_path, model)
    fresh = lf.init(model, params.config)
    for path in params:
        assert torch.equal(params[path]["A0"], fresh[path]["A0"])
        assert torch.equal(params[path]["B0"], fresh[path]["B0"])
        assert not torch.equal(params[path]["A"], fresh[path]["A"])


def test_from_peft_trains_on(tmp_path):
    """The imported leaves are ordinary trainable leaves: a plain optimizer loop lowers the loss."""
    peft_trained(IMPORT_CASES["lora"](), tmp_path, steps=1)
    model = tiny_qwen3()
    params = lf.from_peft(tmp_path, model)
    optimizer = torch.optim.AdamW(lf.trainable_leaves(params), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = lf.apply(model, params, qwen3_batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ---- round trips ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(c for c in EXPORT_CASES if not c.startswith("pissa") and c != "hra"))
def test_round_trip_is_bitwise(case, tmp_path):
    model = tiny_qwen3()
    params = perturbed(lf.init(model, EXPORT_CASES[case](), seed=0))
    lf.to_peft(params, tmp_path / "a")
    back = lf.from_peft(tmp_path / "a", model)
    assert type(back.config) is type(params.config)
    assert back.targets == params.targets
    assert [(p, k) for p, k, _ in back.leaves()] == [(p, k) for p, k, _ in params.leaves()]
    for (_, _, a), (_, _, b) in zip(back.leaves(), params.leaves()):
        assert torch.equal(a, b) and a.dtype == b.dtype and a.requires_grad == b.requires_grad
    for f in ("r", "alpha", "dtype", "use_rslora", "d_initial", "projection_prng_key"):
        assert getattr(back.config, f, None) == getattr(params.config, f, None)
    assert torch.equal(logits(model, back), logits(model, params))
    # Writing the imported adapter again gives the same files, byte for byte.
    lf.to_peft(back, tmp_path / "b")
    for name in (_peft.WEIGHTS_NAME, _peft.CONFIG_NAME):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_round_trip_hra_rebuilds_u0_paired(tmp_path):
    """PEFT stores u only: u comes back bitwise, u0 as u's even columns twice (R(u0) = I), which is u0 itself
    while u is at its init."""
    model = tiny_qwen3().eval()
    initial = lf.init(model, EXPORT_CASES["hra"](), seed=0)
    lf.to_peft(initial, tmp_path / "init")
    back = lf.from_peft(tmp_path / "init", model)
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(back.leaves(), initial.leaves()))

    params = perturbed(initial)
    lf.to_peft(params, tmp_path / "a")
    back = lf.from_peft(tmp_path / "a", model)
    for path in params:
        assert torch.equal(back[path]["u"], params[path]["u"])
        u0 = back[path]["u0"]
        assert torch.equal(u0[:, 0::2], params[path]["u"][:, 0::2]) and torch.equal(u0[:, 1::2], u0[:, 0::2])
    torch.testing.assert_close(logits(model, back), logits(model, params), rtol=0, atol=ATOL)
    lf.to_peft(back, tmp_path / "b")
    for name in (_peft.WEIGHTS_NAME, _peft.CONFIG_NAME):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_from_peft_rebuilds_what_peft_does_not_store(tmp_path):
    """DoRA's ‖W_i‖² and VeRA's regenerated projections are what `lf.init` makes; an untrained PEFT HRA (u still
    paired) imports as the exact identity, as `lf.init`'s does."""
    model = tiny_qwen3()
    for case in ("dora", "vera-no-projection", "hra"):
        peft.get_peft_model(tiny_qwen3(), IMPORT_CASES[case]()).save_pretrained(tmp_path / case)
        params = lf.from_peft(tmp_path / case, model)
        fresh = lf.init(model, params.config)
        frozen = lf.split(params)[1]
        for path, leaf, tensor in frozen.leaves():
            expected = params[path]["u"] if leaf == "u0" else fresh[path][leaf]
            assert torch.equal(tensor, expected), f"{case}: {path}.{leaf}"
        assert frozen.num_params() > 0
    assert torch.equal(logits(model, params), logits(model))


def test_dora_on_a_4bit_base_rebuilds_the_norms_from_the_dequantized_weight(tmp_path):
    """On a bitsandbytes base, ‖W_i‖² comes from the dequantized weight, as in `lf.init` and in PEFT's DoRA."""
    # Train mode on both sides: in eval mode bnb's CPU Linear4bit forward is not x·deq(W)ᵀ (off by ~2e-3).
    model = tiny_qwen3_4bit()
    params = perturbed(lf.init(model, lf.DoRAConfig(r=4, target_names=(r"(q|down)_proj$",)), seed=0))
    lf.to_peft(params, tmp_path)
    back = lf.from_peft(tmp_path, model)
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(back.leaves(), params.leaves()))
    theirs = logits(peft.PeftModel.from_pretrained(tiny_qwen3_4bit(), tmp_path).train())
    torch.testing.assert_close(logits(model, back), theirs, rtol=0, atol=ATOL)


def test_round_trip_road_writes_group_size_none_as_its_int(tmp_path):
    """ROADConfig `group_size=None` that resolves to one int on every target comes back as that int: the same
    pairing, so the same leaves (bitwise) and the same logits."""
    model = tiny_qwen3().eval()
    params = perturbed(lf.init(model, EXPORT_CASES["road-none"](), seed=0))
    lf.to_peft(params, tmp_path)
    assert (read_json(tmp_path)["variant"], read_json(tmp_path)["group_size"]) == ("road_4", 64)
    back = lf.from_peft(tmp_path, model)
    assert (back.config.variant, back.config.group_size) == ("road_4", 64)
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(back.leaves(), params.leaves()))
    assert torch.equal(logits(model, back), logits(model, params))


def test_from_peft_road_reads_peft_defaults_for_absent_fields(tmp_path):
    """A config without `variant` / `group_size` means PEFT's defaults, road_1 and 64, as PEFT reads it too."""
    theirs = peft_trained(peft.RoadConfig(target_modules=["q_proj", "o_proj"], init_weights=False), tmp_path)
    fields = read_json(tmp_path)
    del fields["variant"], fields["group_size"]
    write_json(tmp_path, fields)
    model = tiny_qwen3().eval()
    params = lf.from_peft(tmp_path, model)
    assert (params.config.variant, params.config.group_size) == ("road_1", 64)
    torch.testing.assert_close(logits(model, params), theirs, rtol=0, atol=ATOL)
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(tiny_qwen3().eval(), tmp_path)), theirs)


def test_to_peft_refuses_road_group_size_none_that_differs_per_target(tmp_path):
    """None resolves per target (64 on q_proj, 32 on the 32-wide k_proj); PEFT has one `group_size` for all."""
    params = lf.init(tiny_qwen3(), lf.ROADConfig(target_names=("q_proj", "k_proj")), seed=0)
    with pytest.raises(
        ValueError,
        match=r"to_peft: ROADConfig `group_size`=None resolves to different group sizes per target \(64 for q_proj "
        r"\(2 modules\); 32 for k_proj \(2 modules\)\), and PEFT's ROAD has one `group_size` for all targets.*"
        r"explicit `group_size` \(e.g. 32",
    ):
        lf.to_peft(params, tmp_path)
    assert not (tmp_path / _peft.CONFIG_NAME).exists()


def test_round_trip_pissa_gives_the_equivalent_lora(tmp_path):
    """PiSSA exports as the rank-2r LoRA A' = [A; A0], B' = [B, −B0]; that is what comes back, bitwise."""
    model = tiny_qwen3().eval()
    params = perturbed(lf.init(model, EXPORT_CASES["pissa"](), seed=0))
    lf.to_peft(params, tmp_path)
    back = lf.from_peft(tmp_path, model)
    assert isinstance(back.config, lf.LoRAConfig) and (back.config.r, back.config.alpha) == (8, 16.0)
    for path in params:
        assert torch.equal(back[path]["A"], torch.cat([params[path]["A"], params[path]["A0"]]))
        assert torch.equal(back[path]["B"], torch.cat([params[path]["B"], -params[path]["B0"]], dim=1))
    torch.testing.assert_close(logits(model, back), logits(model, params), rtol=0, atol=ATOL)


def test_round_trip_keeps_bfloat16(tmp_path):
    model = tiny_qwen3()
    params = perturbed(lf.init(model, lf.LoRAConfig(r=2, dtype=torch.bfloat16), seed=0))
    lf.to_peft(params, tmp_path)
    back = lf.from_peft(tmp_path, model)
    assert back.config.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(back.leaves(), params.leaves()))


# ---- target selection -------------------------------------------------------------------------------------------

SELECTION_CASES = [
    ("qwen3", dict(target_modules=["q_proj", "v_proj"])),
    ("qwen3", dict(target_modules="all-linear")),
    ("qwen3", dict(target_modules=r".*self_attn\.(q|k)_proj")),
    ("qwen3", dict(target_modules=["q_proj", "up_proj"], exclude_modules=["layers.0.self_attn.q_proj"])),
    ("qwen3", dict(target_modules=["mlp.gate_proj", "o_proj"], exclude_modules=r".*\.1\.mlp\..*")),
    ("qwen3", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1])),
    ("qwen3", dict(target_modules=["o_proj"], layers_to_transform=0, layers_pattern="layers")),
    ("qwen3", dict(target_modules=["model.layers.1.mlp.up_proj", "k_proj"])),
    ("minilm", dict(target_modules=["query", "value"])),
    ("minilm", dict(target_modules="all-linear")),
    ("minilm", dict(target_modules=["dense"])),
    ("minilm", dict(target_modules=["query", "key"], layers_to_transform=[0, 5], layers_pattern="layer")),
    (
        "minilm",
        dict(target_modules=r".*attention\.self\.(query|key)", exclude_modules=["encoder.layer.3.attention.self.key"]),
    ),
]


@pytest.mark.parametrize(
    "subject,targeting", SELECTION_CASES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(SELECTION_CASES)]
)
def test_target_translation_selects_what_peft_selects(subject, targeting):
    build = {"qwen3": tiny_qwen3, "minilm": minilm}[subject]
    expected = peft.get_peft_model(build(), peft.LoraConfig(r=2, **targeting)).base_model.targeted_module_names
    model = build()
    fields = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **targeting}
    _, cfg, selection = _peft.config_from_peft(fields, model)
    assert selection == expected
    assert [t.path for t in lf.targets(model, cfg)] == expected
    # A readable translation (PEFT's patterns and `layers`), not the exact-path fallback.
    assert cfg.target_names != (f"^(?:{_peft.exact_regex(expected)})$",)
    layers = targeting.get("layers_to_transform")
    assert cfg.layers == (None if layers is None else tuple(layers) if isinstance(layers, list) else (layers,))


def test_exact_fallback_selects_exactly_the_given_modules():
    model = tiny_qwen3()
    wanted = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj", "lm_head"]
    cfg = _peft._exact_targets(lf.LoRAConfig(r=2, target_names=("q_proj",)), model, wanted)
    assert [t.path for t in lf.targets(model, cfg)] == wanted


# ---- refusals ---------------------------------------------------------------------------------------------------


@pytest.fixture
def good_dir(tmp_path):
    model = tiny_qwen3()
    lf.to_peft(lf.init(model, lf.LoRAConfig(r=4, target_names=(r"q_proj$",)), seed=0), tmp_path, model=model)
    return tmp_path


REFUSED_FIELDS = [
    ("peft_type", "POLY", r"`peft_type`=\"POLY\" is not one lora_func reads"),
    (
        "modules_to_save",
        ["lm_head"],
        r"missing keys \['base_model.model.lm_head.weight'\]",
    ),
    ("bias", "all", r"`bias`=\"all\" is not supported: lora_func adapters hold no bias"),
    ("fan_in_fan_out", "yes", r"`fan_in_fan_out` must be true or false"),
    ("lora_bias", True, r"`lora_bias`=true"),
    ("layer_replication", [[0, 1]], r"`layer_replication`"),
    ("trainable_token_indices", [1, 2], r"`trainable_token_indices`"),
    ("use_qalora", True, r"`use_qalora`"),
    (
        "target_parameters",
        ["mlp.experts.gate_up_proj"],
        r"`target_parameters`=\[\"mlp.experts.gate_up_proj\"\] matches no",
    ),
    ("init_lora_weights", "olora", r"`init_lora_weights`=\"olora\" is not supported: that initialisation rewrites"),
    ("init_lora_weights", "loftq", r"`init_lora_weights`=\"loftq\""),
    ("init_lora_weights", "pissa_fast", r"`init_lora_weights`=\"pissa_fast\""),
    ("a_future_field", {"on": True}, r"`a_future_field`=\{\"on\": true\} is not supported: lora_func does not know"),
    ("target_modules", ["embed_tokens"], r"missing keys \['base_model.model.model.embed_tokens.lora_embedding_A'"),
    ("target_modules", ["norm"], r"`target_modules` selects 'model.norm' \(Qwen3RMSNorm\), a norm layer;"),
    ("target_modules", ["mlp"], r"`target_modules` selects 'model.layers.0.mlp' \(Qwen3MLP\)"),
    ("target_modules", ["nowhere"], r"`target_modules`=\[\"nowhere\"\] selects no module"),
    ("target_modules", None, r"`target_modules` is null"),
    ("layers_to_transform", [0], r"`layers_to_transform` needs a list `target_modules`"),
    ("layers_pattern", "layers", r"`layers_pattern` needs `layers_to_transform`"),
    ("rank_pattern", {"q_proj": 0}, r"`rank_pattern` value for 'q_proj' is invalid"),
    ("r", 100, r"`r`=100 exceeds min\(d_in, d_out\)=64"),
    ("use_rslora", "yes", r"`use_rslora` must be true or false"),
    ("use_dora", True, r"missing keys \['base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector'"),
]


@pytest.mark.parametrize("name,value,message", REFUSED_FIELDS, ids=[f"{n}={v}" for n, v, _ in REFUSED_FIELDS])
def test_from_peft_refuses_what_it_cannot_express(good_dir, name, value, message):
    fields = read_json(good_dir)
    fields[name] = value
    if name == "layers_to_transform":
        fields["target_modules"] = ".*q_proj"
    write_json(good_dir, fields)
    with pytest.raises(ValueError, match=message):
        lf.from_peft(good_dir, tiny_qwen3())


@pytest.mark.parametrize(
    "name,value",
    [
        ("fan_in_fan_out", True),  # PEFT reads it per layer: false for nn.Linear
        ("a_future_field", None),
        ("task_type", "CAUSAL_LM"),
        ("peft_version", "0.9.0"),
        ("init_lora_weights", "gaussian"),
        ("eva_config", {"rho": 2.0}),
        ("inference_mode", False),
    ],
)
def test_from_peft_accepts_fields_without_effect(good_dir, name, value):
    reference = lf.from_peft(good_dir, tiny_qwen3())
    fields = read_json(good_dir)
    fields[name] = value
    write_json(good_dir, fields)
    params = lf.from_peft(good_dir, tiny_qwen3())
    assert params.config == reference.config
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(params.leaves(), reference.leaves()))


def test_from_peft_refuses_missing_key_config_absent_fields(good_dir):
    fields = read_json(good_dir)
    del fields["r"]
    write_json(good_dir, fields)
    with pytest.raises(ValueError, match="`r` is missing"):
        lf.from_peft(good_dir, tiny_qwen3())


def edit_tensors(directory, edit) -> None:
    path = directory / _peft.WEIGHTS_NAME
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t.pop(KEY), rf"missing keys \['{KEY}'\] and unexpected keys \[\]"),
        (
            lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}),
            r"missing keys \[\] and unexpected keys \['base_model.model.lm_head.lora_A.weight'\]",
        ),
        (
            lambda t: t.update({"model.layers.0.self_attn.q_proj.lora_A.weight": t.pop(KEY.replace("_B", "_A"))}),
            r"unexpected keys \['model.layers.0.self_attn.q_proj.lora_A.weight'\]",
        ),
        (lambda t: t.update({KEY: torch.zeros(64, 3)}), rf"key '{KEY}' has shape \(64, 3\), expected \(64, 4\)"),
        (lambda t: t.update({KEY: t[KEY].bfloat16()}), r"tensors must share one floating dtype"),
    ],
    ids=["missing", "unexpected", "no-prefix", "shape", "mixed-dtype"],
)
def test_from_peft_refuses_bad_tensor_files(good_dir, edit, message):
    edit_tensors(good_dir, edit)
    with pytest.raises(ValueError, match=message):
        lf.from_peft(good_dir, tiny_qwen3())


def test_from_peft_refuses_bad_directories(good_dir, tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        lf.from_peft(tmp_path / "absent", tiny_qwen3())
    (good_dir / _peft.WEIGHTS_NAME).write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="is not a valid safetensors file"):
        lf.from_peft(good_dir, tiny_qwen3())
    (good_dir / _peft.WEIGHTS_NAME).rename(good_dir / "adapter_model.bin")
    with pytest.raises(ValueError, match="has no adapter_model.safetensors .adapter_model.bin is a pickle"):
        lf.from_peft(good_dir, tiny_qwen3())
    (good_dir / _peft.CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json' is not JSON"):
        lf.from_peft(good_dir, tiny_qwen3())
    (good_dir / _peft.CONFIG_NAME).unlink()
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        lf.from_peft(good_dir, tiny_qwen3())


def transpose_ia3_l(directory):
    edit_tensors(directory, lambda t: t.update({k: v.t().contiguous() for k, v in t.items() if "k_proj" in k}))


# (PEFT config saved by PEFT, edit of its JSON fields or a function of the directory, message)
METHOD_REFUSALS = {
    "ia3-mixed-feedforward": (
        lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        {},
        r"`feedforward_modules`=\[\"down_proj\"\] covers 2 of the 6 modules `target_modules` selects, and one "
        r"lora_func Params holds one variant: this adapter is two in lora_func, lf.IA3Config on k_proj, v_proj "
        r"\(4 modules\) and lf.IA3FFConfig on down_proj \(2 modules\)",
    ),
    "ia3-null-feedforward": (
        lambda: peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]),
        {"feedforward_modules": None},
        r"`feedforward_modules`=null is not supported: PEFT fills it from its own per-architecture table",
    ),
    "ia3-feedforward-not-subset": (
        lambda: peft.IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]),
        {"feedforward_modules": ["mlp.down_proj"]},
        r"`feedforward_modules` must be a subset of `target_modules`",
    ),
    "ia3-field-it-lacks": (
        lambda: peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]),
        {"layers_to_transform": [0]},
        r"`layers_to_transform`=\[0\] is not supported: lora_func does not know this IA3 field",
    ),
    "ia3-layout": (
        lambda: peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]),
        transpose_ia3_l,
        r"k_proj.ia3_l' has shape \(1, 32\), expected \(32, 1\) \(64 -> 32\)",
    ),
    "hra-gram-schmidt": (
        lambda: peft.HRAConfig(r=4, target_modules=["q_proj"], apply_GS=True),
        {},
        r"`apply_GS`=true is not supported: lora_func's HRA does not offer Gram-Schmidt",
    ),
    "hra-odd-r": (
        lambda: peft.HRAConfig(r=4, target_modules=["q_proj"]),
        {"r": 3},
        r"cannot be expressed in lora_func: HRAConfig: `r` must be even",
    ),
    "dora-pissa": (
        lambda: peft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]),
        {"init_lora_weights": "pissa"},
        r"`use_dora`=true is not supported: lora_func reads DoRA with a plain LoRA init only",
    ),
    "vera-projection-unexpected": (
        lambda: peft.VeraConfig(r=4, target_modules=["q_proj"]),
        {"save_projection": False},
        r"missing keys \[\] and unexpected keys \['base_model.vera_A', 'base_model.vera_B'\]",
    ),
    "vera-projection-missing": (
        lambda: peft.VeraConfig(r=4, target_modules=["q_proj"]),
        lambda d: edit_tensors(d, lambda t: t.pop("base_model.vera_B")),
        r"missing keys \['base_model.vera_B'\]",
    ),
    "vera-field-it-lacks": (
        lambda: peft.VeraConfig(r=4, target_modules=["q_proj"]),
        {"exclude_modules": ["layers.0.self_attn.q_proj"]},
        r"`exclude_modules`=\[\"layers.0.self_attn.q_proj\"\] is not supported: lora_func does not know this VERA",
    ),
    "vera-save-projection-type": (
        lambda: peft.VeraConfig(r=4, target_modules=["q_proj"]),
        {"save_projection": "yes"},
        r"`save_projection` must be true or false",
    ),
    "road-group-size-null": (
        lambda: peft.RoadConfig(group_size=16, target_modules=["q_proj"]),
        {"group_size": None},
        r"`group_size` must be an int \(PEFT's RoadConfig\), got null",
    ),
    "road-group-size-misfit": (
        lambda: peft.RoadConfig(group_size=32, target_modules=["k_proj"]),
        {"group_size": 64},
        r"ROADConfig: `group_size`=64 does not fit 'model.layers.0.self_attn.k_proj': d_out=32",
    ),
    "road-group-size-float": (
        lambda: peft.RoadConfig(group_size=16, target_modules=["q_proj"]),
        {"group_size": 6.5},
        r"`group_size` must be an int",
    ),
    "road-variant": (
        lambda: peft.RoadConfig(group_size=16, target_modules=["q_proj"]),
        {"variant": "road_3"},
        r"cannot be expressed in lora_func: ROADConfig: `variant` must be one of \['road_1', 'road_2', 'road_4'\]",
    ),
    "road-field-it-lacks": (
        lambda: peft.RoadConfig(group_size=16, target_modules=["q_proj"]),
        {"layers_to_transform": [0]},
        r"`layers_to_transform`=\[0\] is not supported: lora_func does not know this ROAD field",
    ),
}


@pytest.mark.parametrize("case", sorted(METHOD_REFUSALS))
def test_from_peft_refuses_what_a_method_cannot_express(case, tmp_path):
    peft_config, edit, message = METHOD_REFUSALS[case]
    peft.get_peft_model(tiny_qwen3(), peft_config()).save_pretrained(tmp_path)
    if callable(edit):
        edit(tmp_path)
    else:
        write_json(tmp_path, {**read_json(tmp_path), **edit})
    with pytest.raises(ValueError, match=message):
        lf.from_peft(tmp_path, tiny_qwen3())


def test_to_peft_refuses_what_peft_hra_cannot_express(tmp_path):
    model = tiny_qwen3()
    params = lf.init(model, lf.HRAConfig(r=4, target_names=("q_proj",), rank_pattern={"layers.1.self_attn.q_proj": 2}))
    with pytest.raises(
        ValueError, match=r"`rank_pattern` gives some targets another value, and PEFT's HRA has one `r`"
    ):
        lf.to_peft(params, tmp_path)
    params = lf.init(model, lf.HRAConfig(r=4, target_names=("q_proj",)), seed=0)
    path = "model.layers.1.self_attn.q_proj"
    unpaired = params.replace({**params, path: {**params[path], "u0": params[path]["u0"].roll(1, dims=1)}})
    with pytest.raises(ValueError, match=rf"HRA leaf {path}.u0 does not have its columns in equal pairs"):
        lf.to_peft(unpaired, tmp_path)


def test_exact_regex_matches_exactly_its_paths():
    import re

    paths = ["0", "net.2", "a.1.b.3.c", "a.2.b.3.c", "a.2.b.4.c", "blocks.10.attn.qkv", "x.y"]
    others = ["1", "net.20", "a.1.b.4.c", "a.3.b.3.c", "blocks.1.attn.qkv", "blocks.10.attn", "xzy", "a.1.b.3.cc"]
    pattern = _peft.exact_regex(paths)
    assert all(re.fullmatch(pattern, p) for p in paths)
    assert not any(re.fullmatch(pattern, p) for p in others)


def test_an_entry_with_a_tensor_layout_change(monkeypatch, tmp_path):
    """`tensor_out`/`tensor_in` of an entry (IA3 stores (d,) vectors as (d, 1)): written, read back, checked."""
    import dataclasses

    lora = next(m for m in _peft.METHODS if m.variant == "lora")
    column = dataclasses.replace(
        lora,
        tensor_out=lambda leaf, t: t.reshape(-1, 1) if leaf == "A" else t,
        tensor_in=lambda leaf, t, shape: t.reshape(shape) if leaf == "A" and t.numel() == shape[0] * shape[1] else t,
    )
    monkeypatch.setattr(_peft, "METHODS", tuple(column if m is lora else m for m in _peft.METHODS))
    model = tiny_qwen3()
    params = perturbed(lf.init(model, lf.LoRAConfig(r=2, target_names=("q_proj",)), seed=0))
    lf.to_peft(params, tmp_path)
    assert load_file(tmp_path / _peft.WEIGHTS_NAME)[KEY.replace("_B", "_A")].shape == (128, 1)
    back = lf.from_peft(tmp_path, model)
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(back.leaves(), params.leaves()))

    edit_tensors(tmp_path, lambda t: t.update({KEY.replace("_B", "_A"): torch.zeros(64, 1)}))
    with pytest.raises(ValueError, match=r"lora_A.weight' has shape \(64, 1\), expected \(128, 1\)"):
        lf.from_peft(tmp_path, model)


def test_to_peft_refuses_the_root_module_as_target(tmp_path):
    params = lf.init(torch.nn.Linear(8, 8), lf.LoRAConfig(r=2), seed=0)
    with pytest.raises(ValueError, match="the root module is a target, and PEFT cannot adapt"):
        lf.to_peft(params, tmp_path)
