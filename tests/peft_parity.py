"""PEFT as the numerical reference: twin models, leaf copying, and the output-and-gradient comparison.

A lora_func adapter and a PEFT adapter with the same leaf values, on two copies of the same tiny Qwen3,
must give the same logits and the same gradients on every trainable leaf. The scaffold a method's test builds on:
`peft_twin` (the two adapted models, same leaves), `assert_same_as_peft` (one training step compared),
`assert_peft_files_round_trip` (a PEFT file read by `from_peft`, written back by `to_peft`, PEFT's logits both
ways) and `assert_convolutions_match_peft` (all of it on `tiny_cnn`'s convolutions).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from components import cnn_batch, perturbed, qwen3_batch, tiny_cnn, tiny_qwen3
from conftest import tiny_qwen3_4bit
from torch import nn

import lora_func as lf

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_PROJECTIONS = (r"(q|k|v|o|gate|up|down)_proj$",)


def random_biases(model: nn.Module, seed: int = 5) -> nn.Module:
    """Fill every linear bias with noise (HF initialises them to zero, which would hide bias handling)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(".bias") and "norm" not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def twins(*, bits: int | None = None, attention_bias: bool = False) -> tuple[nn.Module, nn.Module]:
    """Two identical tiny Qwen3 models: the first for lora_func, the second to be wrapped by PEFT."""
    if bits == 4:
        assert not attention_bias
        return tiny_qwen3_4bit(), tiny_qwen3_4bit()
    return tuple(random_biases(tiny_qwen3(attention_bias=attention_bias)) for _ in range(2))


def dequantized_twins() -> tuple[nn.Module, nn.Module]:
    """A 4-bit tiny Qwen3 for lora_func, and a float one holding its dequantized weights for PEFT methods
    that have no bitsandbytes layer."""
    quantized, plain = tiny_qwen3_4bit(), tiny_qwen3()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if type(module).__name__ == "Linear4bit":
                plain.get_submodule(name).weight.copy_(lf.kinds.linear.dense_weight(module))
    return quantized, plain


def peft_layer(peft_model: nn.Module, path: str) -> nn.Module:
    return peft_model.get_base_model().get_submodule(path)


def randomized(params: lf.Params, draw: Callable[[str, str, torch.Tensor, torch.Generator], torch.Tensor]) -> lf.Params:
    """`params` with each trainable leaf replaced by `draw(path, leaf, tensor, gen)` (values off their init)."""
    gen = torch.Generator().manual_seed(11)
    trainable, frozen = lf.split(params)
    entries = {
        path: {k: draw(path, k, v.detach(), gen).requires_grad_() for k, v in entry.items()}
        for path, entry in trainable.items()
    }
    return lf.combine(trainable.replace(entries), frozen)


def copy_into_peft(peft_model: nn.Module, params: lf.Params, peft_param: Callable[[nn.Module, str], nn.Parameter]):
    """Copy each trainable leaf into the PEFT parameter `peft_param(layer, leaf)` (reshaped to its shape)."""
    with torch.no_grad():
        for path, leaf, tensor in lf.split(params)[0].leaves():
            if path == lf._params.SHARED:
                continue
            target = peft_param(peft_layer(peft_model, path), leaf)
            target.copy_(tensor.reshape(target.shape))


def assert_same_as_peft(
    model: nn.Module,
    params: lf.Params,
    peft_model: nn.Module,
    peft_param: Callable[[nn.Module, str], nn.Parameter],
    *,
    atol: float = 1e-5,
    grad_rtol: float = 1e-4,
    grad_atol: float = 1e-6,
) -> dict[str, float]:
    """Same logits and same leaf gradients for one training step; returns the max differences seen."""
    batch = qwen3_batch()
    out = lf.apply(model, params, batch)
    ref = peft_model(**batch)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=atol)
    out.loss.backward()
    ref.loss.backward()
    worst = {"logits": (out.logits - ref.logits).abs().max().item(), "grad": 0.0}
    for path, leaf, tensor in lf.split(params)[0].leaves():
        expected = peft_param(peft_layer(peft_model, path), leaf).grad
        got = tensor.grad.reshape(expected.shape)
        torch.testing.assert_close(got, expected, rtol=grad_rtol, atol=grad_atol, msg=f"{path}.{leaf}")
        worst["grad"] = max(worst["grad"], (got - expected).abs().max().item())
    return worst


def peft_leaf(layer: nn.Module, leaf: str) -> nn.Parameter:
    """PEFT's parameter for a leaf held in a per-adapter ParameterDict under the same name (LoHa, LoKr, ...)."""
    return getattr(layer, leaf)["default"]


def peft_twin(
    cfg: lf.AdapterConfig,
    peft_config,
    draw: Callable[[str, str, torch.Tensor, torch.Generator], torch.Tensor],
    peft_param: Callable[[nn.Module, str], nn.Parameter] = peft_leaf,
    *,
    model: nn.Module | None = None,
    twin: nn.Module | None = None,
) -> tuple[nn.Module, lf.Params, nn.Module]:
    """`(model, params, peft_model)`: `model` (default: the first of `twins()`) adapted by lora_func with `cfg`, its
    trainable leaves replaced by `draw` (off their init), and `twin` under PEFT's `peft_config` holding the same
    leaf values; both adapt the same modules."""
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    if model is None:
        model, twin = twins()
    params = randomized(lf.init(model, cfg, seed=0), draw)
    peft_model = peft.get_peft_model(twin, peft_config)
    wrapped = {p for p, m in peft_model.get_base_model().named_modules() if isinstance(m, BaseTunerLayer)}
    assert {t.path for t in params.targets} == wrapped
    copy_into_peft(peft_model, params, peft_param)
    return model, params, peft_model


def identity_then_deltas(model: nn.Module, cfg: lf.AdapterConfig) -> list[tuple[nn.Module, dict, torch.Tensor]]:
    """Assert that `cfg`'s adapter leaves `model`'s logits bitwise unchanged at init; then, its leaves perturbed,
    `(module, leaves, ΔW)` per target from `lf.delta_weights`, for a method's test to check against its formula."""
    params = lf.init(model, cfg, seed=0)
    batch = qwen3_batch()
    with torch.no_grad():
        assert torch.equal(lf.apply(model, params, batch).logits, model(**batch).logits)
    params = perturbed(params, seed=4)
    out = []
    for key, dw in lf.delta_weights(model, params).items():
        path = key.removesuffix(".weight")
        out.append((model.get_submodule(path), {k: v.detach() for k, v in params[path].items()}, dw))
    return out


def assert_peft_files_round_trip(tmp_path, peft_config, marker: str, scale: float, steps: int = 0) -> lf.Params:
    """A PEFT adapter on a tiny Qwen3 (its parameters whose name holds `marker` drawn N(0, scale²) where scale > 0,
    then trained `steps` AdamW steps by PEFT) saved by PEFT: `from_peft` gives PEFT's logits, and `to_peft` of what
    it read loads in PEFT and gives them too. Returns the params `from_peft` read."""
    import peft

    model, twin = twins()
    model.eval(), twin.eval()
    peft_model = peft.get_peft_model(twin, peft_config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if marker in name and scale > 0:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    if steps:
        trained = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-2)
        batch = qwen3_batch(seed=3)
        for _ in range(steps):
            optimizer.zero_grad()
            peft_model(**batch).loss.backward()
            optimizer.step()
    peft_model.save_pretrained(tmp_path / "peft")
    batch = qwen3_batch()
    with torch.no_grad():
        ref = peft_model(**batch).logits
    params = lf.from_peft(tmp_path / "peft", model)
    with torch.no_grad():
        torch.testing.assert_close(lf.apply(model, params, batch).logits, ref, rtol=0, atol=1e-5)

    lf.to_peft(params, tmp_path / "back", model=model)
    loaded = peft.PeftModel.from_pretrained(twins()[1].eval(), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=1e-5)
    return params


CONVS = ["stem", "conv", "mix", "down", "pointwise"]  # tiny_cnn's: plain, "same", grouped, strided, 1×1 (zero padding)


def assert_convolutions_match_peft(
    tmp_path,
    cfg: lf.AdapterConfig,
    peft_config,
    draw: Callable[[str, str, torch.Tensor, torch.Generator], torch.Tensor],
    peft_param: Callable[[nn.Module, str], nn.Parameter] = peft_leaf,
) -> dict[str, float]:
    """The same on `tiny_cnn` (its `CONVS` targeted): outputs and leaf gradients equal PEFT's given the same leaves,
    and `to_peft` loads in PEFT, `from_peft` reads it back, both giving PEFT's outputs. Returns the max differences."""
    import peft

    model, params, peft_model = peft_twin(cfg, peft_config, draw, peft_param, model=tiny_cnn(), twin=tiny_cnn())
    x = cnn_batch()
    out, ref = lf.apply(model, params, x), peft_model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    out.square().mean().backward()
    ref.square().mean().backward()
    worst = {"outputs": (out - ref).abs().max().item(), "grad": 0.0}
    for path, leaf, tensor in lf.split(params)[0].leaves():
        expected = peft_param(peft_layer(peft_model, path), leaf).grad
        torch.testing.assert_close(tensor.grad, expected, rtol=1e-4, atol=1e-6, msg=f"{path}.{leaf}")
        worst["grad"] = max(worst["grad"], (tensor.grad - expected).abs().max().item())

    model.eval(), peft_model.eval()
    lf.to_peft(params, tmp_path, model=model)
    loaded = peft.PeftModel.from_pretrained(tiny_cnn().eval(), tmp_path)
    back = lf.from_peft(tmp_path, model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), peft_model(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(lf.apply(model, back, x), peft_model(x), rtol=0, atol=1e-5)
    return worst


def assert_trained_peft_files_round_trip(tmp_path, peft_config, *, steps: int = 3, lr: float = 1e-2) -> lf.Params:
    """A PEFT adapter on a tiny Qwen3 trained `steps` AdamW steps by PEFT, saved by PEFT: `from_peft` gives PEFT's
    logits, and `to_peft` of what it read loads in PEFT and gives them too. Returns the params `from_peft` read."""
    import peft

    model, twin = twins()
    model.eval()
    peft_model = peft.get_peft_model(twin, peft_config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        peft_model(**qwen3_batch(seed=20 + step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    batch = qwen3_batch()
    with torch.no_grad():
        ref = peft_model(**batch).logits
        assert not torch.allclose(ref, model(**batch).logits)  # trained: not the base model
    params = lf.from_peft(tmp_path / "peft", model)
    with torch.no_grad():
        torch.testing.assert_close(lf.apply(model, params, batch).logits, ref, rtol=0, atol=1e-5)

    lf.to_peft(params, tmp_path / "back", model=model)
    loaded = peft.PeftModel.from_pretrained(twins()[1].eval(), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=1e-5)
    return params
