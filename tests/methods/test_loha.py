"""LoHa against its formula (dense ΔW = s (W1a W1b) ⊙ (W2a W2b)) and against PEFT's LoHa given the same leaves:
outputs, gradients, and files both ways."""

from __future__ import annotations

import pytest
import torch
from components import cnn_batch, perturbed, qwen3_batch, tiny_cnn, tiny_qwen3
from peft_parity import PROJECTIONS, assert_same_as_peft, copy_into_peft, randomized, twins

import lora_func as lf

peft = pytest.importorskip("peft")


def _peft_leaf(layer, leaf):
    return getattr(layer, leaf)["default"]


def _draw(path, leaf, tensor, gen):
    return 0.3 * torch.randn(tensor.shape, generator=gen)


def test_dense_formula_and_identity_at_init():
    model = tiny_qwen3().eval()
    params = lf.init(model, lf.LoHaConfig(r=4, alpha=6.0), seed=0)
    batch = qwen3_batch()
    with torch.no_grad():
        assert torch.equal(lf.apply(model, params, batch).logits, model(**batch).logits)
    params = perturbed(params, seed=4)
    for path, dw in lf.delta_weights(model, params).items():
        f = params[path.removesuffix(".weight")]
        want = (
            1.5
            * torch.einsum("or,ri->oi", f["hada_w1_a"], f["hada_w1_b"])
            * torch.einsum("or,ri->oi", f["hada_w2_a"], f["hada_w2_b"])
        )
        torch.testing.assert_close(dw, want, rtol=1e-6, atol=1e-7)


def test_matches_peft_outputs_and_gradients():
    model, twin = twins()
    params = randomized(lf.init(model, lf.LoHaConfig(r=4, target_names=PROJECTIONS), seed=0), _draw)
    peft_model = peft.get_peft_model(twin, peft.LoHaConfig(r=4, target_modules=list(PROJECTIONS)))
    assert len(params.targets) == sum(hasattr(m, "hada_w1_a") for m in peft_model.modules()) == 14
    copy_into_peft(peft_model, params, _peft_leaf)
    worst = assert_same_as_peft(model, params, peft_model, _peft_leaf)
    assert worst["logits"] <= 1e-5


def test_from_peft_gives_peft_logits_and_to_peft_loads_in_peft(tmp_path):
    model, twin = twins()
    model.eval(), twin.eval()
    cfg = peft.LoHaConfig(
        r=4, alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2}
    )
    peft_model = peft.get_peft_model(twin, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "hada_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(tmp_path / "peft")
    batch = qwen3_batch()
    with torch.no_grad():
        ref = peft_model(**batch).logits
    params = lf.from_peft(tmp_path / "peft", model)
    assert params.config.r == 4 and params.config.alpha == 12
    with torch.no_grad():
        torch.testing.assert_close(lf.apply(model, params, batch).logits, ref, rtol=0, atol=1e-5)

    lf.to_peft(params, tmp_path / "back", model=model)
    loaded = peft.PeftModel.from_pretrained(twins()[1].eval(), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=1e-5)


def test_peft_fields_it_cannot_honour_are_refused(tmp_path):
    model = tiny_qwen3()
    peft.get_peft_model(tiny_qwen3(), peft.LoHaConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    config = tmp_path / "adapter_config.json"
    config.write_text(config.read_text().replace('"use_effective_conv2d": false', '"use_effective_conv2d": true'))
    with pytest.raises(lf.AdapterFileError, match="use_effective_conv2d"):
        lf.from_peft(tmp_path, model)


CONVS = ["stem", "conv", "mix", "down", "pointwise"]  # plain, "same", grouped, strided, 1×1 (zero padding, as PEFT's)


def test_convolutions_match_peft_outputs_gradients_and_files(tmp_path):
    """nn.Conv2d targets (grouped, strided, 1×1 too): PEFT's LoHa on the flattened kernel, given the same leaves."""
    model, twin = tiny_cnn(), tiny_cnn()
    cfg = lf.LoHaConfig(r=2, alpha=3.0, target_names=(rf"^({'|'.join(CONVS)})$",))
    params = randomized(lf.init(model, cfg, seed=0), _draw)
    peft_model = peft.get_peft_model(twin, peft.LoHaConfig(r=2, alpha=3, target_modules=CONVS))
    copy_into_peft(peft_model, params, _peft_leaf)
    x = cnn_batch()
    out, ref = lf.apply(model, params, x), peft_model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    out.square().mean().backward()
    ref.square().mean().backward()
    for path, leaf, tensor in lf.split(params)[0].leaves():
        expected = _peft_leaf(peft_model.get_base_model().get_submodule(path), leaf).grad
        torch.testing.assert_close(tensor.grad, expected, rtol=1e-4, atol=1e-6, msg=f"{path}.{leaf}")

    model.eval(), peft_model.eval()
    lf.to_peft(params, tmp_path, model=model)
    loaded = peft.PeftModel.from_pretrained(tiny_cnn().eval(), tmp_path)
    back = lf.from_peft(tmp_path, model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), peft_model(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(lf.apply(model, back, x), peft_model(x), rtol=0, atol=1e-5)
