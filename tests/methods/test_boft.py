"""BOFT against PEFT's BOFT given the same leaves (outputs, gradients, files both ways, convolutions, a 4-bit base),
and against its definition: the identity at init, and W' = diag(s) W Rᵀ with R orthogonal.

PEFT computes more than one butterfly factor only through its CUDA extension (`fbd_cuda`, a block-diagonal
assembly); on a CPU it silently uses one. `extension` stands in a pure-torch block-diagonal for it, so that PEFT's
own butterfly code runs here; `no_extension` is PEFT as it runs on a CPU by default (`torch.block_diag`).
"""

from __future__ import annotations

import json

import pytest
import torch
from components import qwen3_batch, tiny_qwen3
from peft_parity import (
    PROJECTIONS,
    assert_convolutions_match_peft,
    assert_peft_files_round_trip,
    assert_same_as_peft,
    peft_twin,
    randomized,
    twins,
)

import lora_func as lf

peft = pytest.importorskip("peft")
boft_layer = pytest.importorskip("peft.tuners.boft.layer")


class _BlockDiagonal:
    """`fbd_cuda`'s two functions in torch: (N, D, b, b) blocks -> (N, D·b, D·b), and the blocks of a gradient."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor.unbind(0)) for factor in blocks])]

    @staticmethod
    def backward(grad, blocks):
        N, D, b, _ = blocks.shape
        return [
            torch.stack([torch.stack([g[j * b : (j + 1) * b, j * b : (j + 1) * b] for j in range(D)]) for g in grad])
        ]


@pytest.fixture
def extension(monkeypatch):
    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _BlockDiagonal())


@pytest.fixture
def no_extension(monkeypatch):
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)


CASES = {
    "default": {},
    "block num 8": {"boft_block_size": 0, "boft_block_num": 8},
    "butterfly 2": {"boft_block_size": 8, "boft_n_butterfly_factor": 2},
    "butterfly 3": {"boft_block_size": 0, "boft_block_num": 16, "boft_n_butterfly_factor": 3},
}


def _peft_leaf(layer, leaf):
    return getattr(layer, leaf)["default"]


def _draw(path, leaf, tensor, gen):
    if leaf == "boft_s":
        return 1.0 + 0.1 * torch.randn(tensor.shape, generator=gen)
    return 0.1 * torch.randn(tensor.shape, generator=gen)


@pytest.mark.parametrize("case", list(CASES))
def test_identity_at_init_and_an_orthogonal_rotation_scaled(case):
    model = tiny_qwen3().eval()
    params = lf.init(model, lf.BOFTConfig(**CASES[case]), seed=0)
    batch = qwen3_batch()
    with torch.no_grad():
        assert torch.equal(lf.apply(model, params, batch).logits, model(**batch).logits)
    params = randomized(params, _draw)
    for key, dw in lf.delta_weights(model, params).items():
        path = key.removesuffix(".weight")
        W = model.get_submodule(path).weight.double()
        s = params[path]["boft_s"].detach().double()
        rotated = (W + dw.double()) / s  # W Rᵀ: the rows of W rotated, so their Gram matrix is W's
        torch.testing.assert_close(rotated @ rotated.T, W @ W.T, rtol=1e-5, atol=1e-5)
        assert (rotated - W).abs().max() > 1e-2


@pytest.mark.usefixtures("extension")
@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft_outputs_and_gradients(case):
    model, params, peft_model = peft_twin(
        lf.BOFTConfig(**CASES[case], target_names=PROJECTIONS),
        peft.BOFTConfig(**CASES[case], target_modules=list(PROJECTIONS)),
        _draw,
        _peft_leaf,
    )
    assert len(params.targets) == sum(hasattr(m, "boft_R") for m in peft_model.modules()) == 14
    assert_same_as_peft(model, params, peft_model, _peft_leaf)


@pytest.mark.usefixtures("no_extension")
def test_matches_peft_as_it_runs_without_its_extension():
    model, params, peft_model = peft_twin(
        lf.BOFTConfig(boft_block_size=16, target_names=PROJECTIONS),
        peft.BOFTConfig(boft_block_size=16, target_modules=list(PROJECTIONS)),
        _draw,
        _peft_leaf,
    )
    assert_same_as_peft(model, params, peft_model, _peft_leaf)


@pytest.mark.usefixtures("extension")
def test_matches_peft_on_a_4bit_base():
    """PEFT's BOFT runs bitsandbytes' Linear4bit on the rotated input: the same base, leaves and step."""
    model, twin = twins(bits=4)
    model, params, peft_model = peft_twin(
        lf.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_names=PROJECTIONS),
        peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=list(PROJECTIONS)),
        _draw,
        _peft_leaf,
        model=model,
        twin=twin,
    )
    assert_same_as_peft(model, params, peft_model, _peft_leaf)


@pytest.mark.usefixtures("extension")
@pytest.mark.parametrize("case", ["default", "butterfly 3"])
def test_from_peft_of_a_trained_adapter_gives_peft_logits_and_to_peft_loads_in_peft(case, tmp_path):
    cfg = peft.BOFTConfig(**CASES[case], target_modules=["q_proj", "v_proj", "down_proj"])
    params = assert_peft_files_round_trip(tmp_path, cfg, "boft_", 0.0, steps=3)
    fields = ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor")
    want = lf.BOFTConfig(**CASES[case])
    assert [getattr(params.config, f) for f in fields] == [getattr(want, f) for f in fields]


@pytest.mark.usefixtures("extension")
@pytest.mark.parametrize("fields", [{}, {"boft_n_butterfly_factor": 2}], ids=["default", "butterfly 2"])
def test_convolutions_match_peft_outputs_gradients_and_files(fields, tmp_path):
    """nn.Conv2d targets PEFT's BOFT Conv2d has (groups 1, square kernels): strided 3×3 (fan-in 72) and 1×1 (16)."""
    convs = ["down", "pointwise"]
    cfg = lf.BOFTConfig(**fields, target_names=(rf"^({'|'.join(convs)})$",))
    assert_convolutions_match_peft(tmp_path, cfg, peft.BOFTConfig(**fields, target_modules=convs), _draw, _peft_leaf)


def test_merge_equals_the_unmerged_forward_on_every_convolution():
    """Grouped, "same"-padded and dilated convolutions too (PEFT has no layer for them): the merged kernel
    computes what the adapter does."""
    from components import cnn_batch, tiny_cnn

    model = tiny_cnn().eval()
    cfg = lf.BOFTConfig(boft_block_size=0, boft_block_num=2, target_names=(r"^(conv|mix|dilated|pointwise)$",))
    params = randomized(lf.init(model, cfg, seed=0), _draw)
    x = cnn_batch()
    with torch.no_grad():
        expected = lf.apply(model, params, x)
        merged = torch.func.functional_call(model, lf.merge(model, params), (x,))
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert (expected - model(x)).abs().max() > 1e-2


def test_what_it_does_not_compute_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="`boft_dropout`=0.1 is not supported"):
        lf.BOFTConfig(boft_dropout=0.1)
    with pytest.raises(ValueError, match="exactly one of `boft_block_size` and `boft_block_num`"):
        lf.BOFTConfig(boft_block_size=4, boft_block_num=4)
    with pytest.raises(ValueError, match=r"`boft_block_size`=12 .* must divide 64"):
        lf.init(tiny_qwen3(), lf.BOFTConfig(boft_block_size=12))
    with pytest.raises(ValueError, match=r"must be a multiple of 2\^\(`boft_n_butterfly_factor` − 1\) = 4"):
        lf.init(tiny_qwen3(), lf.BOFTConfig(boft_block_size=0, boft_block_num=2, boft_n_butterfly_factor=3))

    from components import tiny_cnn

    model = tiny_cnn()
    params = lf.init(model, lf.BOFTConfig(boft_block_size=0, boft_block_num=2, target_names=(r"^mix$",)))
    for given in ({"model": model}, {}):
        with pytest.raises(ValueError, match="'mix' .* PEFT's BOFT Conv2d reads square kernels"):
            lf.to_peft(params, tmp_path / "grouped", **given)
    assert not (tmp_path / "grouped").exists()


@pytest.mark.usefixtures("no_extension")
def test_a_file_peft_saved_without_its_extension_is_refused_when_its_factors_disagree(tmp_path):
    """PEFT on a CPU writes one butterfly factor under `boft_n_butterfly_factor=2`: lora_func will not read it."""
    peft.get_peft_model(
        tiny_qwen3(), peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=["q_proj"])
    ).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["boft_n_butterfly_factor"] == 2
    with pytest.raises(lf.AdapterFileError, match="boft_R"):
        lf.from_peft(tmp_path, tiny_qwen3())
