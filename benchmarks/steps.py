"""What the benchmarks time: the training steps of lora_func, PEFT and the ideal, built once for every script.

    steps = {"ideal": ideal_step(frozen, batch), "lora_func": lora_func_step(base, params, batch),
             "peft": peft_step(peft_model(base), batch)}
    harness.alternate(steps, repeats=15)

A step is forward, loss, backward and dropping the trainable gradients (set to None); with `optimizer=True`
an AdamW step comes before the gradients are dropped. The ideal is the frozen base on `inputs_embeds` that
require grad: forward plus the input-gradient backward through every layer, no weight gradient and no
optimizer, which is what a zero-cost adapter would take. Each step returns its loss, detached, so that a
script can check that every contender computes the same loss before timing them.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import harness  # noqa: F401  (puts this checkout's lora_func first on the path, not an installed one)
import torch
from torch import nn

import lora_func as lf

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 8, 16
LR = 1e-4  # AdamW's, where a step has an optimizer


def projection_names() -> tuple[str, ...]:
    """lora_func's `target_names` for the seven projections of every decoder layer."""
    return tuple(rf"\.{p}$" for p in PROJECTIONS)


def peft_model(base: nn.Module, r: int = RANK, alpha: float = ALPHA, **extra) -> nn.Module:
    """PEFT's LoRA (`lora_dropout=0`) on the seven projections of a deep copy of `base`; `extra` goes to
    `LoraConfig` (e.g. `use_dora=True`)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(PROJECTIONS), lora_dropout=0.0, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(base), cfg)


def ideal_step(frozen: nn.Module, batch: dict) -> Callable[[], torch.Tensor]:
    embed = frozen.get_input_embeddings()

    def step():
        x = embed(batch["input_ids"]).detach().requires_grad_()
        loss = frozen(inputs_embeds=x, labels=batch["labels"]).loss
        loss.backward()
        return loss.detach()

    return step


def _train_step(loss_of: Callable[[], torch.Tensor], leaves: list[torch.Tensor], optimizer: bool):
    adamw = torch.optim.AdamW(leaves, lr=LR) if optimizer else None

    def step():
        loss = loss_of()
        loss.backward()
        if adamw is not None:
            adamw.step()
        for t in leaves:
            t.grad = None
        return loss.detach()

    return step


def lora_func_step(
    model: nn.Module, params: lf.Params, batch: dict, optimizer: bool = False
) -> Callable[[], torch.Tensor]:
    return _train_step(lambda: lf.apply(model, params, batch).loss, lf.trainable_leaves(params), optimizer)


def peft_step(model: nn.Module, batch: dict, optimizer: bool = False) -> Callable[[], torch.Tensor]:
    return _train_step(lambda: model(**batch).loss, [p for p in model.parameters() if p.requires_grad], optimizer)


def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        with torch.no_grad():
            return fn()

    return call


def check_same_loss(steps: dict[str, Callable[[], torch.Tensor]], rtol: float, script: str) -> dict[str, float]:
    """One call of each step (adapters at init are the identity): every loss within `rtol` of the first's, or a
    RuntimeError naming the contender that differs. Returns {contender: loss}."""
    losses = {name: fn().item() for name, fn in steps.items()}
    first, reference = next(iter(losses.items()))
    for name, value in losses.items():
        if abs(value - reference) > rtol * abs(reference):
            raise RuntimeError(f"{script}: {name} computes loss {value}, {first} computes {reference}")
    return losses
