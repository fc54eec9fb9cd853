"""Model builders and adapter helpers shared by the tests: plain functions, which `conftest.py` re-exports."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

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


# Fields a variant needs on the tests' tiny layers (8 -> 16, 16 -> 16): FourierFT's default 1000 frequencies exceed
# their entries, which PEFT refuses too; VBLoRA's default vectors (256 long) divide none of their widths. RandLoRA's
# default `randlora_alpha` (640) is PEFT's 20 · r for its default r = 32: at the tests' r = 4 it would scale ΔW by
# 160, and leaves moved by 0.05 (γ starts at 1 / min(d_in, d_out)) would make ΔW dwarf W.
TINY_FIELDS = {
    "fourierft": {"n_frequency": 100},
    "vblora": {"vector_length": 8, "num_vectors": 32},
    "randlora": {"randlora_alpha": 4.0},
}


def tiny_config(name: str, **fields) -> lf.AdapterConfig:
    """The registered variant `name`'s config with `fields`, sized for tiny layers (`TINY_FIELDS`)."""
    from lora_func.variants import REGISTRY

    return REGISTRY[name].config(**{**TINY_FIELDS.get(name, {}), **fields})


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


# -- the other layer kinds: small real architectures built from their configs -------------------------------------


def tiny_gpt2(seed: int = 0, **overrides) -> nn.Module:
    """GPT-2 (transformers' Conv1D layers, weights stored (d_in, d_out)), dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    fields = dict(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    fields.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**fields)).train()


def with_linear_layers(model: nn.Module) -> nn.Module:
    """A copy of `model` whose transformers Conv1D layers are nn.Linear layers holding the transposed weights."""
    import copy

    copied = copy.deepcopy(model)
    for module in list(copied.modules()):
        for name, child in list(module.named_children()):
            if type(child).__name__ == "Conv1D":
                linear = nn.Linear(child.nx, child.nf)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(module, name, linear)
    return copied


class TinyConvNet(nn.Module):
    """A small ResNet-like CNN: plain, strided, grouped (`mix`), dilated and 1×1 convolutions, GroupNorm (so that
    train mode changes no buffers), a residual, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding="same", bias=False)
        self.mix = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(16, 16, 3, padding=2, dilation=2, padding_mode="reflect")
        self.pointwise = nn.Conv2d(16, 16, 1)
        self.norm = nn.GroupNorm(4, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = h + self.mix(torch.relu(self.conv(h)))
        h = torch.relu(self.down(h))
        h = h + self.pointwise(torch.relu(self.dilated(h)))
        return self.head(self.norm(h).mean(dim=(-2, -1)))


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyConvNet().train()


def cnn_batch(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def tiny_qwen3_moe(seed: int = 0, **overrides) -> nn.Module:
    """Qwen3-MoE with fused experts: `mlp.experts.gate_up_proj (4, 32, 32)`, `mlp.experts.down_proj (4, 32, 16)`."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    fields = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**fields)).train()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 3) -> nn.Module:
    """BertForSequenceClassification from a small config (a fresh `classifier` head), dropout off."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).train()


def classification_batch(batch: int = 4, seq: int = 10, vocab: int = 128, labels: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    return {"input_ids": ids, "labels": torch.randint(0, labels, (batch,), generator=gen)}


# -- registry-wide tests on the tiny Qwen3 ------------------------------------------------------------------------

# Layers of the tiny Qwen3 that a variant adapting no linear layer takes where a test names linear projections.
KIND_TARGETS = {"norm": (r"(input|post_attention)_layernorm$",), "embedding": (r"embed_tokens$",)}


def target_names_for(variant, names: tuple[str, ...]) -> tuple[str, ...]:
    """`names` (linear projections of the tiny Qwen3) for a variant that adapts linear layers; else the layers of
    the first of its kinds in `KIND_TARGETS` (LN Tuning: the blocks' norms; Trainable Tokens: the embedding); None
    for a variant whose targets are chosen otherwise (ReFT: blocks, by `layers`)."""
    if "linear" in variant.kinds:
        return names
    return next((KIND_TARGETS[k] for k in variant.kinds if k in KIND_TARGETS), None)


class Calls(TorchFunctionMode):
    """Counts the calls of one torch function made inside the block (by the model, its hooks, the adapter)."""

    def __init__(self, func) -> None:
        super().__init__()
        self.func, self.count = func, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func is self.func
        return func(*args, **(kwargs or {}))


def token_rows(rows: int, seed: int = 5, seq: int = 10, vocab: int = 128) -> list[dict[str, torch.Tensor]]:
    """Training rows of one length whose labels cover different numbers of tokens (a masked prompt of 0..4 tokens),
    so that a per-row mean and the mean over the batch's tokens differ (and accumulating 2 × 2 equals a batch of 4
    only when the loss is normalised over the whole accumulated batch)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(rows):
        ids = torch.randint(0, vocab, (seq,), generator=gen)
        labels = ids.clone()
        labels[: i % 5] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": labels})
    return out


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A batch of `token_rows`' rows (HF Trainer's `data_collator`)."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
