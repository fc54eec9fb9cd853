"""Models that checkpoint themselves (`torch.utils.checkpoint` in their own forward, no HF flag), and HF gradient
checkpointing switched on inside an open block: backward would recompute those parts without the adapter
(reentrant: `None` adapter gradients, silently; non-reentrant: torch's opaque `CheckpointError`). lora_func
refuses at the forward, naming `torch.utils.checkpoint` and what to do, for every variant, and leaves nothing
behind; the ways that work keep working: the same model without its checkpointing, HF checkpointing enabled
before the block, and the user's own checkpoint around the whole `lf.apply` (gradients equal to no checkpoint).
"""

from __future__ import annotations

import pytest
import torch
from components import tiny_config
from conftest import assert_untouched, changes, perturbed, qwen3_batch, snapshot, tiny_qwen3
from torch import nn
from torch.utils.checkpoint import checkpoint

import lora_func as lf
from lora_func._variant import GradientCalibration
from lora_func.variants import REGISTRY

VARIANTS = sorted(REGISTRY)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class SelfCheckpointing(nn.Module):
    """A model whose forward checkpoints each block when `self.checkpointing` is set (as timm's and many research
    models' `grad_checkpointing` flags do)."""

    def __init__(self, d: int = 16, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
        self.head = nn.Linear(d, 4)
        self.checkpointing: bool | None = None  # None: off; else use_reentrant

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            if self.checkpointing is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.checkpointing)
        return self.head(x)


def build() -> SelfCheckpointing:
    torch.manual_seed(0)
    return SelfCheckpointing().train()


BATCH = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))


def make(name, model):
    variant = REGISTRY[name]
    calibration = [BATCH] if variant.calibrated else None
    loss = None  # LoRA-GA's gradients: of the mean-square loss the test trains with
    if variant.capability(GradientCalibration) is not None:
        loss = lambda m, batch: m(batch).pow(2).mean()  # noqa: E731
    cfg = tiny_config(name, r=4, exclude_names=("head",))
    return perturbed(lf.init(model, cfg, seed=0, calibration_data=calibration, calibration_loss=loss))


def grads(params, run):
    leaves = lf.trainable_leaves(params)
    for t in leaves:
        t.grad = None
    run().pow(2).mean().backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("name", [n for n in VARIANTS if "linear" in REGISTRY[n].kinds])  # the model: linears only
def test_model_that_checkpoints_itself_is_refused_by_name(name, reentrant):
    model = build()
    params = make(name, model)
    expected = grads(params, lambda: lf.apply(model, params, BATCH))  # the same model, its checkpointing off
    assert all(g is not None for g in expected)
    before = snapshot(model)
    model.checkpointing = reentrant
    with pytest.raises(RuntimeError, match=r"torch\.utils\.checkpoint.*Switch the model's own checkpointing off"):
        lf.apply(model, params, BATCH)
    model.checkpointing = None
    assert_untouched(model, before)
    for g, e in zip(grads(params, lambda: lf.apply(model, params, BATCH)), expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpoint_around_the_whole_apply_still_trains(reentrant):
    """The user's own checkpoint around `lf.apply` (the block opens inside it) is lora_func's to see: allowed,
    with the gradients of no checkpointing."""
    model = build()
    params = make("lora", model)
    expected = grads(params, lambda: lf.apply(model, params, BATCH))
    got = grads(
        params,
        lambda: checkpoint(lambda x: lf.apply(model, params, x), BATCH.requires_grad_(), use_reentrant=reentrant),
    )
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_hf_checkpointing_switched_on_inside_an_open_block_is_refused(reentrant):
    model = tiny_qwen3(num_hidden_layers=2)
    params = perturbed(lf.init(model, lf.LoRAConfig(r=4)))
    before = snapshot(model)
    twin = tiny_qwen3(num_hidden_layers=2)  # what HF's switch itself leaves on a model (a hook per enable)
    twin_before = snapshot(twin)
    twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    twin.activation_checkpointing_disable()
    hf_leaves = changes(twin, twin_before)
    with pytest.raises(RuntimeError, match=r"gradient checkpointing was switched on inside the open block"):
        with lf.inject(model, params):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model(**qwen3_batch()).loss.backward()
    model.activation_checkpointing_disable()
    assert changes(model, before) == hf_leaves
    # Enabled before the block: trained as without checkpointing.
    leaves = lf.trainable_leaves(params)
    expected = grads(params, lambda: lf.apply(model, params, qwen3_batch()).loss)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    got = grads(params, lambda: lf.apply(model, params, qwen3_batch()).loss)
    assert len(got) == len(leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
