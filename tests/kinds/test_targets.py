"""Targeting: linear-like modules, roles by shape, name and layer filters, and the errors for bad configs."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import minilm, tiny_qwen3
from torch import nn

import lora_func as lf

QWEN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def paths(found):
    return [t.path for t in found]


def test_default_selects_every_projection_but_not_lm_head():
    model = tiny_qwen3()
    found = lf.targets(model, lf.LoRAConfig(r=4))
    expected = [f"model.layers.{i}.{part}.{name}" for i in range(2) for part, name in _qwen_order()]
    assert paths(found) == expected
    assert all("lm_head" not in p for p in paths(found))


def _qwen_order():
    return [("self_attn", n) for n in QWEN_PROJECTIONS[:4]] + [("mlp", n) for n in QWEN_PROJECTIONS[4:]]


def test_roles_follow_shapes_against_d_model():
    model = tiny_qwen3()  # hidden 64, intermediate 128, 4 heads x 16, 2 kv heads
    by_name = {t.path.rsplit(".", 1)[1]: t for t in lf.targets(model, lf.LoRAConfig(r=4, layers=(0,)))}
    assert by_name["q_proj"].roles == ("reader", "writer")  # 64 -> 64: both, whatever its name
    assert by_name["k_proj"].roles == ("reader",)  # 64 -> 32
    assert by_name["o_proj"].roles == ("reader", "writer")
    assert by_name["gate_proj"].roles == ("reader",)
    assert by_name["down_proj"].roles == ("writer",)
    writers = lf.targets(model, lf.LoRAConfig(r=4, target_roles=("writer",)))
    assert {p.rsplit(".", 1)[1] for p in paths(writers)} == {"q_proj", "o_proj", "down_proj"}


def test_bert_square_layers_are_readers_and_writers():
    model = minilm()
    found = {t.path: t for t in lf.targets(model, lf.LoRAConfig(r=4))}
    assert found["encoder.layer.0.attention.self.query"].roles == ("reader", "writer")
    assert found["encoder.layer.0.attention.output.dense"].roles == ("reader", "writer")
    assert found["encoder.layer.0.intermediate.dense"].roles == ("reader",)
    assert found["encoder.layer.0.output.dense"].roles == ("writer",)
    with pytest.raises(ValueError, match="selects no module"):  # every BERT linear touches the residual width
        lf.targets(model, lf.LoRAConfig(r=4, target_roles=("inner",)))


def test_name_regex_exclude_and_layers():
    model = tiny_qwen3(num_hidden_layers=3)
    cfg = lf.LoRAConfig(r=4, target_names=(r"q_proj$", r"v_proj$"), exclude_names=(r"layers\.1\.",), layers=(1, 2))
    assert paths(lf.targets(model, cfg)) == ["model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]
    bert = lf.targets(minilm(), lf.LoRAConfig(r=4, target_names=r"query$", layers=(5,)))
    assert paths(bert) == ["encoder.layer.5.attention.self.query"]


def test_bitsandbytes_layers_are_targets():
    from conftest import tiny_qwen3_4bit

    found = lf.targets(tiny_qwen3_4bit(), lf.LoRAConfig(r=4))
    assert len(found) == 14 and all(t.module == "Linear4bit" for t in found)


def test_plain_module_without_config_infers_width():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.Linear(8, 8))
    found = {t.path: t.roles for t in lf.targets(model, lf.LoRAConfig(r=2))}
    assert found == {"0": ("reader",), "2": ("writer",), "3": ("reader", "writer")}


def test_selecting_nothing_is_an_error_naming_the_filters():
    with pytest.raises(ValueError, match=r"selects no module.*target_names=\('nothing_here',\)"):
        lf.init(tiny_qwen3(), lf.LoRAConfig(r=4, target_names=("nothing_here",)))
    with pytest.raises(ValueError, match="selects no module"):
        lf.targets(tiny_qwen3(), lf.LoRAConfig(r=4, layers=(7,)))


def test_target_names_that_hit_no_layer_kind_are_an_error():
    with pytest.raises(ValueError, match=r"matches only modules that no layer kind adapts.*norm \(Qwen3RMSNorm\)"):
        lf.init(tiny_qwen3(), lf.LoRAConfig(r=4, target_names=("norm$",)))


def test_layers_count_blocks_never_sub_layers():
    """`layers` picks block i: Qwen3's `layers.i`, BERT's `layer.i`, GPT-2's `h.i`, T5's `block.i` (encoder and
    decoder), never T5's sub-layer index `block.<j>.layer.<i>`."""
    from components import tiny_gpt2
    from transformers import T5Config, T5ForConditionalGeneration

    def blocks(model, pattern):
        found = lf.targets(model, lf.LoRAConfig(r=2, layers=(1,)))
        return {re.search(pattern, t.path).group(0) for t in found}, len(found)

    assert blocks(tiny_qwen3(num_hidden_layers=3), r"^model\.layers\.\d+") == ({"model.layers.1"}, 7)
    assert blocks(minilm(), r"^encoder\.layer\.\d+") == ({"encoder.layer.1"}, 6)
    assert blocks(tiny_gpt2(), r"^transformer\.h\.\d+") == ({"transformer.h.1"}, 4)
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=3, num_heads=4, decoder_start_token_id=0)
    )
    found = [t.path for t in lf.targets(t5, lf.LoRAConfig(r=2, layers=(1,)))]
    assert {re.match(r"^(encoder|decoder)\.block\.\d+", p).group(0) for p in found} == {
        "encoder.block.1",
        "decoder.block.1",
    }
    # every sub-layer of block 1: encoder self-attention + feed-forward (4 + 2), decoder self, cross, ff (4 + 4 + 2)
    assert len(found) == 16 and "encoder.block.1.layer.1.DenseReluDense.wi" in found
    assert not any(p.startswith(("encoder.block.0", "encoder.block.2")) for p in found)


@pytest.mark.parametrize("r", [0, -1])
def test_non_positive_rank_is_an_error(r):
    with pytest.raises(ValueError, match="`r` must be a positive int"):
        lf.LoRAConfig(r=r)


@pytest.mark.parametrize("config", [lf.LoRAConfig, lf.PiSSAConfig, lf.DeLoRAConfig])
def test_rank_above_layer_size_is_an_error_naming_the_layer(config):
    model = tiny_qwen3()  # k_proj is 64 -> 32
    with pytest.raises(ValueError, match=r"`r`=33 exceeds min\(d_in, d_out\)=32 of 'model.layers.0.self_attn.k_proj'"):
        lf.init(model, config(r=33))


def test_bad_config_fields_are_named():
    with pytest.raises(ValueError, match="`target_roles` has 'reeder'"):
        lf.LoRAConfig(target_roles=("reeder",))
    with pytest.raises(ValueError, match="`target_names` pattern"):
        lf.LoRAConfig(target_names=("(",))
    with pytest.raises(ValueError, match="`dtype`"):
        lf.LoRAConfig(dtype=torch.int8)
    with pytest.raises(ValueError, match="`rank_pattern` value"):
        lf.LoRAConfig(rank_pattern={"q_proj": 0})
    with pytest.raises(TypeError, match="`cfg` must be one of"):
        lf.init(tiny_qwen3(), object())


def test_rank_pattern_gives_per_target_shapes():
    model = tiny_qwen3()
    cfg = lf.LoRAConfig(r=4, rank_pattern={"q_proj": 8}, alpha_pattern={r"layers\.1\.self_attn\.v_proj": 2.0})
    params = lf.init(model, cfg, seed=0)
    assert params["model.layers.0.self_attn.q_proj"]["A"].shape == (8, 64)
    assert params["model.layers.0.self_attn.k_proj"]["A"].shape == (4, 64)
    from lora_func._config import config_for

    assert config_for(cfg, "model.layers.1.self_attn.v_proj").alpha == 2.0
    assert config_for(cfg, "model.layers.0.self_attn.v_proj").alpha == 16.0


def test_init_and_targets_leave_the_model_alone():
    from conftest import assert_untouched, snapshot

    model = tiny_qwen3()
    before = snapshot(model)
    lf.targets(model, lf.LoRAConfig(r=4))
    lf.init(model, lf.PiSSAConfig(r=4))
    assert_untouched(model, before)


def test_seed_makes_init_reproducible():
    model = tiny_qwen3()
    a = lf.init(model, lf.LoRAConfig(r=4), seed=7)
    b = lf.init(model, lf.LoRAConfig(r=4), seed=7)
    c = lf.init(model, lf.LoRAConfig(r=4), seed=8)
    path = a.targets[0].path
    assert torch.equal(a[path]["A"], b[path]["A"])
    assert not torch.equal(a[path]["A"], c[path]["A"])
