"""PEFT as the numerical reference: twin models, leaf copying, and the output-and-gradient comparison.

A lora_func adapter and a PEFT adapter with the same leaf values, on two copies of the same tiny Qwen3,
must give the same logits and the same gradients on every trainable leaf.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from conftest import qwen3_batch, tiny_qwen3, tiny_qwen3_4bit
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
