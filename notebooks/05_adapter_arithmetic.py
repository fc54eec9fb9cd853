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
# # 5 · Adapter arithmetic: exact sums, rank, TIES, DARE, magnitude pruning
#
# Two LoRA adapters trained on two tasks, merged into one adapter in every way `lora_func` offers, and each
# merge scored on both tasks' held-out data: the figure a model-merging paper shows.
#
# An adapter is a pytree, so a merge is a function from pytrees to a pytree. The obvious one is wrong:
# averaging the factors, ½(A₁ + A₂) and ½(B₁ + B₂), gives ¼ (B₁ + B₂)(A₁ + A₂), which has the cross terms
# B₁A₂ + B₂A₁. `lf.weighted_sum` concatenates the factors instead (ranks add) and is exact;
# `lf.resize` truncates any ΔW to its best rank-r approximation; `lf.ties`, `lf.dare` and `lf.magnitude_prune`
# run on each adapter's dense ΔW with PEFT's conventions and return a rank-r LoRA. Every claim is asserted.
#
# The tasks split the demo's (notebook 2): which standard-library module does a docstring come from, with the
# twelve modules in two groups of six, **A** (math, re, datetime, collections, decimal, random) and **B** (os,
# threading, socket, logging, tarfile, pathlib); each task is a 6-way choice among its own modules, scored
# by cosine similarity to each module's description. Adapters on the top two layers of the pretrained MiniLM.

# %%
import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import optree
import torch
import torch.nn.functional as F
from torch import nn

import lora_func as lf
from lora_func import demo
from lora_func._demo_data import LABELS, build_dataset

OUT = Path("results/notebooks")
OUT.mkdir(parents=True, exist_ok=True)
STEPS, BATCH, LR, MAX_TOKENS, TOP, SEED = 40, 8, 3e-3, 32, 4, 0
GROUPS = {
    "A": ("math", "re", "datetime", "collections", "decimal", "random"),
    "B": ("os", "threading", "socket", "logging", "tarfile", "pathlib"),
}
started = time.perf_counter()
print(f"{torch.get_num_threads()} thread(s)")

# %% [markdown]
# ## The model, and the frozen bottom computed once
#
# The adapters sit on layers 4 and 5 only, so layers 0–3 compute the same thing for a docstring whatever the
# adapter: their output (and the attention mask the model builds) is computed once per docstring, and training
# and evaluation run only the top two layers. `Top` is an `nn.Module` holding the model's own `encoder`, so its
# module paths are the model's (`encoder.layer.4.attention.self.query`): adapters made by `lf.init(model, …)`
# apply to it unchanged. The check below: `Top` on the cached inputs gives the full model's output, bit for bit.


# %%
class Top(nn.Module):
    """Layers `start`… of a BERT encoder, run on the hidden states and mask that enter layer `start`."""

    def __init__(self, bert: nn.Module, start: int) -> None:
        super().__init__()
        self.encoder, self.start = bert.encoder, start

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layer[self.start :]:
            hidden = layer(hidden, mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden


class _Reached(Exception):
    """Stops the base model at layer TOP: what comes after is not needed for the cache."""


model, tokenizer = demo.load_minilm()
model.eval()
base_state = {k: v.clone() for k, v in model.state_dict().items()}
top = Top(model, TOP)


def features(texts: list[str], check: bool = False) -> dict[str, torch.Tensor]:
    """What enters layer TOP for `texts`: hidden states (n, T, d), the model's attention mask, the token mask."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"], seen["mask"] = args[0], kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if not check:
            raise _Reached

    handle = model.encoder.layer[TOP].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            full = model(**batch).last_hidden_state
    except _Reached:
        full = None
    finally:
        handle.remove()
    if check:
        with torch.no_grad():
            assert torch.equal(top(seen["hidden"], seen["mask"]), full), "Top must compute what the model computes"
    return {"hidden": seen["hidden"], "mask": seen["mask"], "tokens": batch["attention_mask"]}


features(["Return the base-2 logarithm of x.", "Split the pathname into a pair (head, tail)."], check=True)
tasks = {}
for name, modules in GROUPS.items():
    data = build_dataset({m: LABELS[m] for m in modules}, seed=SEED)
    tasks[name] = {
        "data": data,
        "train": features([e.text for e in data.train]),
        "train_y": torch.tensor([e.label for e in data.train]),
        "test": features([e.text for e in data.test]),
        "test_y": torch.tensor([e.label for e in data.test]),
        "labels": features(list(data.label_texts)),
    }
    print(f"task {name}: {', '.join(modules)}; {len(data.train)} training / {len(data.test)} held-out docstrings")

# %% [markdown]
# ## Two adapters, one per task
#
# LoRA r = 8 on the 12 linear layers of layers 4–5 (not the pooler, which mean pooling does not read), 40
# AdamW steps of 8 docstrings each, the demo's loss: cross-entropy over SCALE · cos(docstring, module).


# %%
def embed(params: lf.Params, cached: dict, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the adapted top layers' token states over the real tokens, L2-normalised: (n, d)."""
    hidden, mask, tokens = cached["hidden"], cached["mask"], cached["tokens"]
    if rows is not None:
        hidden, mask, tokens = hidden[rows], mask[rows], tokens[rows]
    out = lf.apply(top, params, (hidden, mask))
    weight = tokens.unsqueeze(-1).to(out.dtype)
    return F.normalize((out * weight).sum(1) / weight.sum(1), dim=-1)


@torch.no_grad()
def accuracy(params: lf.Params) -> dict[str, float]:
    """Held-out accuracy on each task."""
    scores = {}
    for name, task in tasks.items():
        logits = embed(params, task["test"]) @ embed(params, task["labels"]).T
        scores[name] = (logits.argmax(-1) == task["test_y"]).float().mean().item()
    return scores


cfg = lf.LoRAConfig(r=8, alpha=16, layers=(4, 5), exclude_names=("pooler",))


def train(name: str, seed: int) -> lf.Params:
    task = tasks[name]
    params = lf.init(model, cfg, seed=seed)
    optimizer = torch.optim.AdamW(lf.trainable_leaves(params), lr=LR, weight_decay=0.0)
    for rows in demo.batch_order(len(task["data"].train), STEPS, BATCH, seed):
        rows = torch.tensor(rows)
        logits = demo.SCALE * embed(params, task["train"], rows) @ embed(params, task["labels"]).T
        loss = F.cross_entropy(logits, task["train_y"][rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return params


start = time.perf_counter()
adapter = {"A": train("A", SEED), "B": train("B", SEED + 1)}
print(f"trained both adapters in {time.perf_counter() - start:.1f} s")
scores = {"base model": accuracy(lf.init(model, cfg)), "adapter A": accuracy(adapter["A"])}
scores["adapter B"] = accuracy(adapter["B"])
for name, s in scores.items():
    print(f"{name:>10}: task A {s['A']:.1%}, task B {s['B']:.1%}")
adapters, weights = [adapter["A"], adapter["B"]], [1.0, 1.0]

# %% [markdown]
# ## Exact arithmetic
#
# `lf.delta_weights` gives each target's dense ΔW (for LoRA s·B A, never the merged weight). The weighted sum
# ΔW_A + ΔW_B is one LoRA of rank 8 + 8 = 16 whose ΔW equals the dense sum to float rounding; the naive
# average of the factors is far from the average of the ΔW; a negative weight negates a task exactly.

# %%
delta = {name: lf.delta_weights(model, p) for name, p in adapter.items()}
keys = list(delta["A"])


def relative_error(got: dict, want: dict) -> float:
    """‖got − want‖_F / ‖want‖_F over all targets."""
    num = sum(((got[k] - want[k]) ** 2).sum() for k in want)
    return math.sqrt(num / sum((want[k] ** 2).sum() for k in want))


with torch.no_grad():
    exact = lf.weighted_sum(adapters, weights)
    dense_sum = {k: delta["A"][k] + delta["B"][k] for k in keys}
    sum_error = max((lf.delta_weights(model, exact)[k] - dense_sum[k]).abs().max().item() for k in keys)
    mean = lf.weighted_sum(adapters, [0.5, 0.5])
    naive = optree.tree_map(lambda a, b: 0.5 * a + 0.5 * b, adapter["A"], adapter["B"])
    dense_mean = {k: v / 2 for k, v in dense_sum.items()}
    naive_error = relative_error(lf.delta_weights(model, naive), dense_mean)
    mean_error = relative_error(lf.delta_weights(model, mean), dense_mean)
    negated = lf.weighted_sum([adapter["A"]], [-1.0])
    negation_error = max((lf.delta_weights(model, negated)[k] + delta["A"][k]).abs().max().item() for k in keys)
print(f"weighted_sum: rank {exact.config.r}, max |ΔW − (ΔW_A + ΔW_B)| = {sum_error:.1e}")
print(f"average of ΔW: weighted_sum relative error {mean_error:.1e}; averaged factors {naive_error:.2f}")
print(f"negation: max |ΔW + ΔW_A| = {negation_error:.1e}")
assert exact.config.r == 16 and not exact.config.rank_pattern
assert sum_error < 1e-5 and negation_error < 1e-5 and mean_error < 1e-6
assert naive_error > 0.3, "averaging the factors should be far from averaging the adapters"
scores["sum (exact, r=16)"] = accuracy(exact)
scores["mean (exact, r=16)"] = accuracy(mean)
scores["averaged factors"] = accuracy(naive)
scores["−A (negation)"] = accuracy(negated)
for name in ("sum (exact, r=16)", "mean (exact, r=16)", "averaged factors", "−A (negation)"):
    print(f"{name:>18}: task A {scores[name]['A']:.1%}, task B {scores[name]['B']:.1%}")

# %% [markdown]
# ## Merging at lower rank
#
# Four ways to a rank-r adapter for both tasks, weights (1, 1), r ∈ {2, 8}:
#
# - **SVD of the sum**: `lf.resize(exact, r)`, the best rank-r approximation of ΔW_A + ΔW_B (Eckart–Young);
# - **TIES** (density 0.3): keep each ΔW's 30% largest entries, elect a sign per entry, average the agreeing;
# - **DARE** (density 0.3, seed 0): drop 70% of each ΔW's entries at random, rescale by 1/0.3, sum;
# - **magnitude pruning** (density 0.3): keep each ΔW's 30% largest entries, sum.
#
# The truncation error of the SVD merge is checked against the singular values of the dense sum: it is
# exactly the norm of the dropped ones, target by target.

# %%
RANKS, DENSITY = (2, 8), 0.3
methods = {
    "SVD of the sum": lambda r: lf.resize(exact, r),
    "TIES": lambda r: lf.ties(adapters, weights, density=DENSITY, r=r),
    "DARE": lambda r: lf.dare(adapters, weights, density=DENSITY, r=r, seed=SEED),
    "magnitude prune": lambda r: lf.magnitude_prune(adapters, weights, density=DENSITY, r=r),
}
merged, distance = {}, {}
start = time.perf_counter()
for method, make in methods.items():
    for r in RANKS:
        params = make(r)
        merged[method, r] = accuracy(params)
        with torch.no_grad():
            got = lf.delta_weights(model, params)
        distance[method, r] = relative_error(got, dense_sum)
        if method == "SVD of the sum":
            for k in keys:  # Eckart–Young: ‖ΔW − ΔW_r‖_F = ‖(σ_{r+1}, σ_{r+2}, …)‖
                sigma = torch.linalg.svdvals(dense_sum[k].double())
                error = torch.linalg.matrix_norm((got[k] - dense_sum[k]).double())
                assert abs(error - sigma[r:].norm()) <= 1e-5 * sigma.norm(), (k, r)
print(f"{len(merged)} merges made and scored in {time.perf_counter() - start:.1f} s")
again = lf.dare(adapters, weights, density=DENSITY, r=2, seed=SEED)
assert accuracy(again) == merged["DARE", 2], "DARE is seeded: the same seed gives the same adapter"

head = "| merge | rank | task A | task B | ‖ΔW − (ΔW_A + ΔW_B)‖ / ‖ΔW_A + ΔW_B‖ |\n|---|---:|---:|---:|---:|"
rows = [f"| {name} | | {s['A']:.1%} | {s['B']:.1%} | |" for name, s in scores.items()]
rows += [f"| {m} | {r} | {merged[m, r]['A']:.1%} | {merged[m, r]['B']:.1%} | {distance[m, r]:.2f} |" for m, r in merged]
print("\n".join([head, *rows]))

# %% [markdown]
# ## The figure

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
names, width = list(methods), 0.8 / len(RANKS)
x = torch.arange(len(names)).tolist()
references = {"base model": ("k", ":"), "adapter A": ("C0", "--"), "adapter B": ("C1", "--")}
references["sum (exact, r=16)"] = ("C2", "-.")
for ax, task in zip(axes[:2], ("A", "B")):
    for k, r in enumerate(RANKS):
        offset = (k - (len(RANKS) - 1) / 2) * width
        heights = [merged[m, r][task] for m in names]
        ax.bar([i + offset for i in x], heights, width, label=f"rank {r}", color=f"C{k + 4}")
    for name, (color, line) in references.items():
        ax.axhline(scores[name][task], color=color, linestyle=line, linewidth=1.2, label=name)
    ax.set_xticks(x, names)
    ax.set(ylim=(0.6, 0.95), ylabel="held-out accuracy", title=f"task {task}: {', '.join(GROUPS[task])}")
fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=6, fontsize="small")
for k, r in enumerate(RANKS):
    offset = (k - (len(RANKS) - 1) / 2) * width
    axes[2].bar([i + offset for i in x], [distance[m, r] for m in names], width, label=f"rank {r}", color=f"C{k + 4}")
axes[2].set_xticks(x, names)
axes[2].set(ylabel="‖ΔW − (ΔW_A + ΔW_B)‖ / ‖ΔW_A + ΔW_B‖", title="distance of each merge from the exact sum")
axes[2].legend(fontsize="small")
fig.tight_layout(rect=(0, 0.07, 1, 1))
fig.savefig(OUT / "05_adapter_arithmetic.png", dpi=120)
plt.show()

# %% [markdown]
# ## What the data shows
#
# On these 90 + 97 held-out docstrings one docstring is about 1 point of accuracy, so differences of a point
# or two between merges are noise. Asserted below:
#
# - each single-task adapter improves its own task by more than 5 points; adapter A alone costs task B accuracy
#   (training on one task interferes with the other);
# - the exact sum keeps both gains (here all of them), and every rank-r merge, r = 2 included, keeps more than
#   half of each adapter's gain on both tasks;
# - negating adapter A takes task A far below the base model (it unlearns A, and damages B as well);
# - at every rank the SVD merge is the closest to the exact sum (Eckart–Young: all four merges have rank r,
#   and no rank-r matrix is closer); the sparsified merges are further from it in ΔW (TIES averages where
#   signs agree, DARE adds noise), yet all score alike: on these tasks half of ΔW's energy (1 − 0.71² at
#   rank 2) carries the accuracy.

# %%
base, alone = scores["base model"], {name: scores[f"adapter {name}"] for name in GROUPS}
gain = {name: alone[name][name] - base[name] for name in GROUPS}
assert gain["A"] > 0.05 and gain["B"] > 0.05, gain
assert alone["A"]["B"] < base["B"], "adapter A alone was expected to cost task B"
for name in ("sum (exact, r=16)", "mean (exact, r=16)"):
    assert all(scores[name][t] - base[t] > 0.5 * gain[t] for t in GROUPS), (name, scores[name])
for (method, r), s in merged.items():
    kept = {t: (s[t] - base[t]) / gain[t] for t in GROUPS}
    assert min(kept.values()) > 0.5, (method, r, kept)
assert scores["−A (negation)"]["A"] < base["A"] - 0.2, scores["−A (negation)"]
for r in RANKS:
    assert distance["SVD of the sum", r] == min(distance[m, r] for m in methods), r
after = model.state_dict()
assert all(torch.equal(after[k], base_state[k]) for k in base_state), "the model changed"
print(f"every merge keeps more than half of both gains; the model is untouched; {time.perf_counter() - started:.0f} s")
