# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # ReFT against LoRA on SmolLM2 (outside `notebooks/run.py`'s numbered set: it takes minutes)
#
# LoReFT (Wu et al. 2024) edits the hidden states that blocks output, at the first and last tokens of each
# prompt: `h + Rᵀ(W h + b − R h)`, rank r per block. LoRA edits weights. Both train here on the demo's main task
# (`python -m lora_func.demo`: extract a person's name, age and city from a sentence as one line of JSON) on
# SmolLM2-135M-Instruct, with the same data, batches and number of steps, and answer the same held-out prompts by
# greedy generation inside `lf.inject`. Scored by exact match. A third run trains LoReFT as pyreft does, through
# torch's orthogonal parametrization of R instead of `lf.schedule`'s retraction after each step.
#
# `REFT_STEPS` (default 30) and `REFT_HELD_OUT` (default 32) size the run; on a free 2-core CPU expect minutes per
# run (about 6 minutes for all three). The learning rates are first guesses, not sweeps; docs/reft.md records a
# run. Run: `python notebooks/reft_vs_lora_smollm2.py`.

# %%
import os
import time

import torch

import lora_func as lf
from lora_func.demo import chat as demo
from lora_func.demo.tasks import build

STEPS = int(os.environ.get("REFT_STEPS", 30))
BATCH, SEED = 8, 0
HELD_OUT = int(os.environ.get("REFT_HELD_OUT", 32))
model, tokenizer = demo.load_smollm2()
model.requires_grad_(False)
talk = demo.Chat(tokenizer)
task = build(demo.MAIN_TASK, train=400, test=HELD_OUT, seed=SEED)
prompts = [e.prompt for e in task.test]
order = demo.batch_order(len(task.train), STEPS, BATCH, SEED)


def train(params, lr, after_step=None):
    """A plain AdamW loop over `lf.apply`; `after_step(params, step)` runs after each optimizer step."""
    optimizer = torch.optim.AdamW(lf.trainable_leaves(params), lr=lr, weight_decay=0.0)
    model.train()
    losses, start = [], time.perf_counter()
    for step, indices in enumerate(order):
        loss = lf.apply(model, params, talk.training_batch([task.train[i] for i in indices])).loss
        loss.backward()
        optimizer.step()
        if after_step is not None:
            params = after_step(params, step)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return params, losses, time.perf_counter() - start


def evaluate(params):
    replies = demo.generate(model, talk, prompts, params=params, max_new_tokens=demo.MAX_NEW_TOKENS[task.name])
    return demo.score(task, replies)["exact"], replies


rows = {}

# %% [markdown]
# LoRA as the demo trains it (r = 8 on all 210 linear layers), and LoReFT (r = 4 on every block, the first and
# last 5 tokens of the prompt), each at a learning rate that suits it. `lf.schedule` retracts R after each step.

# %%
lora = lf.init(model, lf.LoRAConfig(r=8, alpha=16.0), seed=SEED)
lora, lora_losses, lora_seconds = train(lora, 3e-3)
rows["LoRA r=8, all linear layers"] = (lora, lora_losses, lora_seconds, *evaluate(lora))

reft = lf.init(model, lf.ReFTConfig(r=4, positions="f5+l5"), seed=SEED)
state = lf.schedule_state(reft)


def retract(params, step):
    global state
    params, state = lf.schedule(params, state, step)
    return params


reft, reft_losses, reft_seconds = train(reft, 1e-2, retract)
rows["LoReFT r=4, every block, f5+l5"] = (reft, reft_losses, reft_seconds, *evaluate(reft))
orthonormality = max((reft[p]["R"] @ reft[p]["R"].T - torch.eye(4)).abs().max().item() for p in reft)
print(f"LoReFT after {STEPS} steps: max |R Rᵀ − I| = {orthonormality:.2e}")

# %% [markdown]
# pyreft's way: R through `torch.nn.utils.parametrizations.orthogonal` (a parametrized `(d, r)` weight per block
# whose value is always orthonormal), the optimizer stepping the parametrization's own parameter; the adapter's R
# is that weight's transpose, recomputed at every step. Same init, data and learning rate.

# %%
start_from = lf.init(model, lf.ReFTConfig(r=4, positions="f5+l5"), seed=SEED)
rotations = {}
for path in start_from:
    layer = torch.nn.Linear(4, 576, bias=False)  # weight (d, r), as pyreft's LowRankRotateLayer
    torch.nn.utils.parametrizations.orthogonal(layer)
    with torch.no_grad():
        layer.weight = start_from[path]["R"].T.contiguous()
    rotations[path] = layer
others = [start_from[p][k] for p in start_from for k in ("W", "b")]
optimizer = torch.optim.AdamW([*others, *(p for m in rotations.values() for p in m.parameters())], lr=1e-2)
model.train()
param_losses, start = [], time.perf_counter()
for indices in order:
    current = start_from.replace({p: {**dict(start_from[p]), "R": rotations[p].weight.T} for p in start_from})
    loss = lf.apply(model, current, talk.training_batch([task.train[i] for i in indices])).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    param_losses.append(loss.item())
param_seconds = time.perf_counter() - start
with torch.no_grad():
    final = start_from.replace({p: {**dict(start_from[p]), "R": rotations[p].weight.T.detach()} for p in start_from})
rows["LoReFT, R parametrized as pyreft does"] = (final, param_losses, param_seconds, *evaluate(final))

# %%
base_exact = demo.score(task, demo.generate(model, talk, prompts, max_new_tokens=demo.MAX_NEW_TOKENS[task.name]))[
    "exact"
]
print(f"SmolLM2-135M-Instruct, {task.name} task, {STEPS} steps of {BATCH}, {HELD_OUT} held-out prompts")
print("| adapter | trainable params | last-5 train loss | train s | held-out exact match |")
print("|---|---|---|---|---|")
print(f"| none (base model) | 0 | | | {base_exact:.1%} |")
counts = {
    "LoRA r=8, all linear layers": sum(t.numel() for t in lf.trainable_leaves(lora)),
    "LoReFT r=4, every block, f5+l5": sum(t.numel() for t in lf.trainable_leaves(reft)),
    "LoReFT, R parametrized as pyreft does": sum(t.numel() for t in others)
    + sum(p.numel() for m in rotations.values() for p in m.parameters()),
}
for name, (_, losses, seconds, exact, _) in rows.items():
    tail = sum(losses[-5:]) / len(losses[-5:])
    print(f"| {name} | {counts[name]:,} | {tail:.3f} | {seconds:.0f} | {exact:.1%} |")
for name, (_, _, _, _, replies) in rows.items():
    print(name, "→", replies[:2])
