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
# # 4 · Per-example gradients for data attribution
#
# Which training examples move a query's loss? TracIn (Pruthi et al. 2020, arXiv 2002.08484) scores a
# training example z for a query q by the dot product of their loss gradients, ⟨∇ℓ(q), ∇ℓ(z)⟩: one
# gradient step on z changes the query's loss by about −η ⟨∇ℓ(q), ∇ℓ(z)⟩. A positive score makes z a
# *proponent* (training on it lowers the query's loss), a negative one an *opponent*.
#
# With an adapter, the gradients are over the adapter's leaves only, and `lf.per_example_grads` computes
# every example's gradient in one batched pass (N copies of the adapter, row i using copy i through
# `adapter_ids`); `lf.grad_dots` takes the dot products. This notebook trains a LoRA adapter on the
# demo's docstring task, scores every training docstring for a few held-out queries, checks the gradients
# against a loop over examples, and checks that the scores predict what a gradient step actually does.

# %%
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

import lora_func as lf
from lora_func import demo
from lora_func._demo_data import build_dataset

OUT = Path("results/notebooks")
OUT.mkdir(parents=True, exist_ok=True)
STEPS, BATCH, MAX_TOKENS, CHUNK, SEED = 20, 8, 32, 64, 0
print(f"{torch.get_num_threads()} thread(s)")

# %% [markdown]
# ## Task and loss
#
# The demo's task (notebook 2) with one change: attribution needs each example's loss to depend on that
# example alone, so the label descriptions are embedded once by the base model and held fixed (class
# prototypes), instead of being re-embedded with the adapter at every step. The adapter trains on that
# loss, so the gradients scored below are exactly the ones that trained it.


# %%
model, tokenizer = demo.load_minilm()
model.eval()
data = build_dataset(seed=SEED)
task = demo.Task(data, tokenizer, max_tokens=MAX_TOKENS)


def pool(hidden, mask):
    """Mean over the real tokens, L2-normalised: (n, d)."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


with torch.no_grad():
    prototypes = pool(model(**task.label_batch).last_hidden_state, task.label_batch["attention_mask"])  # (12, d)


def example_losses(docs, y):
    """`loss(output)` for `docs`: each docstring's cross-entropy over the modules, shape (n,)."""

    def loss(out):
        logits = demo.SCALE * pool(out.last_hidden_state, docs["attention_mask"]) @ prototypes.T
        return F.cross_entropy(logits, y, reduction="none")

    return loss


# %% [markdown]
# ## Train an adapter
#
# LoRA r=8 on the top two layers, 20 steps of AdamW. This is the checkpoint whose gradients we score.

# %%
cfg = lf.LoRAConfig(r=8, alpha=16, layers=(4, 5), exclude_names=demo.EXCLUDE)
params = lf.init(model, cfg, seed=SEED)
optimizer = torch.optim.AdamW(lf.trainable_leaves(params), lr=2e-3, weight_decay=0.0)
curve = []
for rows in demo.batch_order(len(data.train), STEPS, BATCH, SEED):
    docs, y = task.batch([data.train[i] for i in rows])
    loss = example_losses(docs, y)(lf.apply(model, params, docs)).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    curve.append(loss.item())
print(f"training loss {curve[0]:.3f} -> {sum(curve[-5:]) / 5:.3f} (mean of the last 5 steps)")

# %% [markdown]
# ## Per-example gradients of every training docstring
#
# One batched pass per chunk of 64 docstrings; each leaf comes back with a leading example dimension.
# The result holds N copies of the adapter's trainable leaves, so large sets go in chunks.

# %%
start = time.perf_counter()
chunks = []
for first in range(0, len(data.train), CHUNK):
    docs, y = task.batch(data.train[first : first + CHUNK])
    chunks.append(lf.per_example_grads(model, params, docs, example_losses(docs, y)))
train_grads = pytree.tree_map(lambda *parts: torch.cat(parts), *chunks)  # (N, ...) on every leaf
seconds = time.perf_counter() - start
n_values = sum(t[0].numel() for _, _, t in train_grads.leaves())
print(f"{len(data.train)} per-example gradients of {n_values:,} values each in {seconds:.1f} s")

# %% [markdown]
# ### Check: the batched pass equals a loop over examples
#
# The reference is plain autograd, one docstring at a time as a batch of one (so without padding).

# %%
LOOPED = 8
trainable_leaves = [t for _, _, t in lf.split(params)[0].leaves()]
for i in range(LOOPED):
    docs, y = task.batch([data.train[i]])
    loss = example_losses(docs, y)(lf.apply(model, params, docs)).sum()
    expected = torch.autograd.grad(loss, trainable_leaves)
    for (path, leaf, g), reference in zip(train_grads.leaves(), expected):
        torch.testing.assert_close(g[i], reference, rtol=1e-4, atol=1e-6, msg=f"example {i}: {path}.{leaf}")
print(f"per_example_grads equals autograd example by example (first {LOOPED} docstrings)")

# %% [markdown]
# ## Scores for some held-out queries
#
# Three held-out docstrings, the first of three modules. `lf.grad_dots` sums the dot products over every
# leaf: a (queries, training examples) matrix.

# %%
query_examples = [next(e for e in data.test if data.labels[e.label] == m) for m in ("math", "threading", "decimal")]
query_docs, query_y = task.batch(query_examples)
query_grads = lf.per_example_grads(model, params, query_docs, example_losses(query_docs, query_y))
scores = lf.grad_dots(query_grads, train_grads)  # (3, N)


def flatten(grads):
    return torch.cat([t.flatten(1) for _, _, t in grads.leaves()], dim=1)  # (n, values)


reference = flatten(query_grads) @ flatten(train_grads).T  # one matmul: another summation order
torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
print("grad_dots equals the dot products of the flattened gradients;", tuple(scores.shape))

train_labels = torch.tensor([e.label for e in data.train])
for q, example in enumerate(query_examples):
    top = scores[q].topk(10).indices
    same = (train_labels[top] == example.label).float().mean().item()
    base_rate = (train_labels == example.label).float().mean().item()
    print(f"\nquery {example.name}: {example.text[:90]}...")
    print(f"  top-10 proponents from the query's module: {same:.0%} (base rate {base_rate:.0%})")
    for i in top[:3].tolist():
        print(f"  + {scores[q, i]:+.3f} {data.train[i].name}: {data.train[i].text[:70]}...")
    for i in scores[q].topk(3, largest=False).indices.tolist():
        print(f"  - {scores[q, i]:+.3f} {data.train[i].name}: {data.train[i].text[:70]}...")

# %% [markdown]
# ## Check: the scores predict what a gradient step does
#
# For the first query, take one plain gradient step of size η on each of its top 5 proponents and top 5
# opponents alone (from the same checkpoint), and measure the query's loss change. TracIn predicts
# −η · score. η is small enough that the first-order prediction should hold.

# %%
q = 0
picked = scores[q].topk(5).indices.tolist() + scores[q].topk(5, largest=False).indices.tolist()
eta = 0.02 / scores[q].abs().max().item()  # the largest predicted change is 0.02 nats
one_query = {k: v[:1] for k, v in query_docs.items()}


def loss_on_query(p):
    with torch.no_grad():
        return example_losses(one_query, query_y[:1])(lf.apply(model, p, one_query)).item()


before = loss_on_query(params)
trainable, frozen = lf.split(params)
predicted, actual = [], []
for i in picked:
    step = {
        path: {leaf: t.detach() - eta * train_grads[path][leaf][i] for leaf, t in e.items()}
        for path, e in trainable.items()
    }
    stepped = lf.combine(trainable.replace(step), frozen)
    predicted.append(-eta * scores[q, i].item())
    actual.append(loss_on_query(stepped) - before)
predicted, actual = torch.tensor(predicted), torch.tensor(actual)
correlation = torch.corrcoef(torch.stack([predicted, actual]))[0, 1].item()
print(f"query loss {before:.4f}; predicted vs actual change: correlation {correlation:.4f}")
for p_i, a_i in zip(predicted.tolist(), actual.tolist()):
    print(f"  predicted {p_i:+.5f}  actual {a_i:+.5f}")
assert torch.equal(predicted.sign(), actual.sign()), "a step on a proponent raised the query's loss (or the reverse)"
assert correlation > 0.95
torch.testing.assert_close(actual, predicted, rtol=0.05, atol=1e-4)

# %% [markdown]
# ## The top influences

# %%
fig, axes = plt.subplots(1, len(query_examples) + 1, figsize=(18, 5), gridspec_kw={"wspace": 1.2})
for ax, q_example, q_scores in zip(axes, query_examples, scores):
    top = q_scores.topk(5).indices.tolist() + q_scores.topk(5, largest=False).indices.tolist()[::-1]
    values = [q_scores[i].item() for i in top]
    colors = ["tab:green" if data.train[i].label == q_example.label else "tab:gray" for i in top]
    ax.barh(range(len(top)), values, color=colors)
    ax.set_yticks(range(len(top)), [data.train[i].name for i in top], fontsize="small")
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set(xlabel="TracIn score ⟨∇ℓ(query), ∇ℓ(example)⟩", title=f"query: {q_example.name}")
axes[0].legend(
    handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in ("tab:green", "tab:gray")],
    labels=["same module as the query", "another module"],
    fontsize="small",
    loc="lower left",
)
check = axes[-1]
check.scatter(predicted, actual)
lim = 1.1 * predicted.abs().max().item()
check.plot([-lim, lim], [-lim, lim], "--", color="gray")
check.set(
    xlabel="predicted change, −η · score",
    ylabel="actual change after one step",
    title=f"query {query_examples[0].name}: loss change",
)
fig.savefig(OUT / "04_data_attribution.png", dpi=120, bbox_inches="tight")
plt.show()
