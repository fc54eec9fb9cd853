"""Model builders and adapter helpers shared by the tests and `benchmarks/gpu.py`.

Plain functions, no pytest: the GPU script imports this module on a machine that may not have pytest.
`conftest.py` re-exports them for the tests.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import lora_func as lf


def qwen3_config(**overrides):
    from transformers import Qwen3Config

    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    return Qwen3Config(**fields)


def tiny_qwen3(seed: int = 0, **overrides) -> nn.Module:
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(qwen3_config(**overrides)).train()


def qwen3_batch(batch: int = 2, seq: int = 12, vocab: int = 128, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def quantize(model: nn.Module, bits: int, device: torch.device | str = "cpu") -> nn.Module:
    """Replace every nn.Linear inside `model.model` (not lm_head) by a bnb Linear4bit (nf4, fp32 compute) or
    Linear8bitLt on `device`; moving a bnb layer to its device is what quantizes it."""
    import bitsandbytes as bnb

    for module in list(model.model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            if bits == 4:
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.float32,
                    quant_type="nf4",
                )
            else:
                q = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, bias=child.bias is not None, has_fp16_weights=False
                )
            q.load_state_dict(child.state_dict())
            setattr(module, name, q.to(device))
    return model.to(device)


def perturbed(params: lf.Params, scale: float = 0.05, seed: int = 3) -> lf.Params:
    """Every trainable leaf moved off its init (B ≠ 0, λ changed), so that every leaf acts on the output and
    gets a gradient. The noise is drawn on the CPU from `seed`, then put on the leaf's device and dtype."""
    gen = torch.Generator().manual_seed(seed)
    trainable, frozen = lf.split(params)
    moved = {
        path: {
            k: (v.detach() + scale * torch.randn(v.shape, generator=gen).to(v.device)).to(v.dtype).requires_grad_()
            for k, v in entry.items()
        }
        for path, entry in trainable.items()
    }
    return lf.combine(trainable.replace(moved), frozen)


# -- what "untouched" means ---------------------------------------------------------------------------------------


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._forward_hooks_with_kwargs)
        for m in model.modules()
    )


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything about a model that lora_func must leave as it was."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        "hooks": hook_count(model),
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "params": {n: id(p) for n, p in model.named_parameters()},
        "training": model.training,
    }


def changes(model: nn.Module, before: dict[str, Any]) -> list[str]:
    """What differs from `before` (a `snapshot`), and any gradient on a base parameter: empty when untouched."""
    now = snapshot(model)
    found = []
    if now["state"].keys() != before["state"].keys():
        found.append(f"state keys {sorted(set(before['state']) ^ set(now['state']))}")
    found += [
        f"state {k}" for k, v in before["state"].items() if k in now["state"] and not torch.equal(v, now["state"][k])
    ]
    found += [f"model {key}" for key in ("flags", "hooks", "attrs", "params", "training") if now[key] != before[key]]
    found += [f"base gradient {n}" for n in sorted(now["grads"])]
    return found
