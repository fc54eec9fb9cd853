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
# # 6 · Differentially private fine-tuning
#
# DP-SGD (Abadi et al. 2016) trains on each example's gradient clipped to a norm C, summed, plus Gaussian
# noise of standard deviation σC; an accountant turns σ, the sampling rate and the number of steps into a
# guarantee (ε, δ). `lf.private_grads` computes that gradient for any adapter (for LoRA without forming the
# batch's per-example gradients of the whole adapter: see `docs/private.md`); the accounting is Opacus's
# (`opacus.accountants`), nothing home-made.
#
# The task is the MiniLM demo's (which standard-library module does a docstring come from?), with one
# change that DP needs: the modules' descriptions are public, so their embeddings are computed once by the
# base model and kept fixed, and each training example's loss depends on its own docstring only. The
# adapter (LoRA r=4 on the top layer's query and value) trains at ε ∈ {1, 3, 8} and without privacy, and
# the same runs go through Opacus + PEFT, side by side. Batches are Poisson-sampled (each docstring joins a
# step's batch with probability q), as the accountant assumes. Short runs, to stay fast on one CPU thread:
# the point is the comparison at equal ε, not the best accuracy on this task.

# %%
import dataclasses
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, TensorDataset

import lora_func as lf
from lora_func import demo
from lora_func._demo_data import build_dataset

OUT = Path("results/notebooks")
OUT.mkdir(parents=True, exist_ok=True)
STEPS, BATCH, MAX_TOKENS, LAYERS, SEED, LR, C = 15, 16, 24, (5,), 0, 2e-2, 1.0
EPSILONS = (1.0, 3.0, 8.0)
print(f"{torch.get_num_threads()} thread(s)")

# %% [markdown]
# ## The model, the task, and the privacy budget
#
# δ = 1/N (N training docstrings) is the usual choice. For each ε, Opacus finds the noise multiplier σ
# that the RDP accountant needs for `STEPS` steps at sampling rate q = BATCH / N.

# %%
model, tokenizer = demo.load_minilm()
model.eval()  # dropout off: the runs differ only by their noise
base_state = {k: v.clone() for k, v in model.state_dict().items()}
data = build_dataset(seed=SEED)
data = dataclasses.replace(data, test=data.test[::2])
task = demo.Task(data, tokenizer, max_tokens=MAX_TOKENS)
N = len(data.train)
q, delta = BATCH / N, 1 / N


def pooled(out, batch):
    mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    return F.normalize((out.last_hidden_state * mask).sum(1) / mask.sum(1), dim=-1)


with torch.no_grad():
    labels = pooled(model(**task.label_batch), task.label_batch)  # (12, d): public, fixed
sigmas = {
    eps: get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q, steps=STEPS) for eps in EPSILONS
}
print(f"N = {N} training docstrings, {len(data.test)} held out; q = {q:.4f}, δ = {delta:.2e}, {STEPS} steps")
print("σ for each ε:", {eps: round(s, 3) for eps, s in sigmas.items()})


def poisson_batches(seed):
    """Each step's batch: every training docstring independently with probability q (Opacus's DPDataLoader)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        rows = (torch.rand(N, generator=gen) < q).nonzero().flatten().tolist()
        assert rows, "an empty Poisson batch (probability e^-16 here)"
        yield task.batch([data.train[i] for i in rows])


def accuracy(embed):
    with torch.no_grad():
        docs, y = task.batch(data.test)
        return (embed(docs).argmax(-1) == y).float().mean().item()


zero_shot = accuracy(lambda docs: pooled(model(**docs), docs) @ labels.T)
print(f"zero-shot held-out accuracy {zero_shot:.1%}")

# %% [markdown]
# ## lora_func: `lf.private_grads` in a plain AdamW loop
#
# The gradient goes into the leaves' `.grad` and AdamW steps as usual (any optimizer is post-processing of
# the private gradient). `expected_batch_size` divides by the expected, not the drawn, batch size, as Opacus
# does under Poisson sampling. Opacus's `RDPAccountant` counts the steps.

# %%
cfg = lf.LoRAConfig(r=4, alpha=8, layers=LAYERS, target_names=(r"query$", r"value$"))


def lora_func_run(epsilon):
    params = lf.init(model, cfg, seed=SEED)
    leaves = lf.trainable_leaves(params)
    optimizer = torch.optim.AdamW(leaves, lr=LR, weight_decay=0.0)
    accountant, generator = RDPAccountant(), torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    for docs, y in poisson_batches(SEED):

        def row_losses(out, y=y, docs=docs):
            return F.cross_entropy(demo.SCALE * pooled(out, docs) @ labels.T, y, reduction="none")

        if epsilon is None:
            loss = row_losses(lf.apply(model, params, docs)).mean()
            grads = torch.autograd.grad(loss, leaves)
        else:
            sigma = sigmas[epsilon]
            private = lf.private_grads(
                model,
                params,
                docs,
                row_losses,
                max_grad_norm=C,
                noise_multiplier=sigma,
                generator=generator,
                expected_batch_size=BATCH,
            )
            grads = [g for _, _, g in private.leaves()]
            accountant.step(noise_multiplier=sigma, sample_rate=q)
        for leaf, g in zip(leaves, grads):
            leaf.grad = g
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - start
    spent = accountant.get_epsilon(delta) if epsilon is not None else float("inf")
    held_out = accuracy(lambda docs: demo.SCALE * pooled(lf.apply(model, params, docs), docs) @ labels.T)
    return {"ε target": epsilon, "ε spent": spent, "accuracy": held_out, "seconds": seconds}


ours = [lora_func_run(eps) for eps in (*EPSILONS, None)]
for row in ours:
    print(row)

# %% [markdown]
# ## Opacus + PEFT
#
# The same LoRA through PEFT (`lora_A`/`lora_B` as `nn.Linear` modules), made private by Opacus's
# `PrivacyEngine` with its default `grad_sample_mode="hooks"` and its Poisson `DPDataLoader`, at the same σ,
# from the same initial adapter (the lora_func init copied into PEFT's `lora_A`, `lora_B`).
# (An `lf.AdapterModule` runs under the engine too, with `grad_sample_mode="no_op"` and per-sample gradients
# from `lf.per_example_grads`: see `docs/private.md`.)

# %%
indices = TensorDataset(torch.arange(N))  # Opacus's DPDataLoader reads the shapes of a dataset's items


def collate(rows):
    return task.batch([data.train[int(i)] for (i,) in rows])


def opacus_peft_run(epsilon):
    torch.manual_seed(SEED)
    peft_cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], layers_to_transform=list(LAYERS), lora_dropout=0.0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(demo.load_minilm()[0].eval(), peft_cfg)
    start_from = lf.init(model, cfg, seed=SEED)  # the same initial adapter as the lora_func runs
    with torch.no_grad():
        for path, leaf, value in start_from.leaves():
            peft.get_parameter(f"base_model.model.{path}.lora_{leaf}.default.weight").copy_(value)
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    loader = DataLoader(indices, batch_size=BATCH, collate_fn=collate, generator=torch.Generator().manual_seed(SEED))
    engine = None
    if epsilon is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "secure RNG turned off": fine for an experiment
            engine = PrivacyEngine(accountant="rdp")
            peft, optimizer, loader = engine.make_private(
                module=peft,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=sigmas[epsilon],
                max_grad_norm=C,
                poisson_sampling=True,
                noise_generator=torch.Generator().manual_seed(SEED),
            )
    if engine is None:
        loader = poisson_batches(SEED)  # without privacy: the lora_func run's batches
    start, steps = time.perf_counter(), 0
    while steps < STEPS:
        for item in loader:
            if steps == STEPS:
                break
            if not isinstance(item, tuple):  # an empty Poisson batch (probability e^-16 here)
                continue
            docs, y = item
            out = peft(input_ids=docs["input_ids"], attention_mask=docs["attention_mask"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Opacus: full backward hook with no input requiring grad
                F.cross_entropy(demo.SCALE * pooled(out, docs) @ labels.T, y).backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
    seconds = time.perf_counter() - start
    spent = engine.get_epsilon(delta) if engine is not None else float("inf")
    module = peft._module if engine is not None else peft
    held_out = accuracy(lambda docs: demo.SCALE * pooled(module(**docs), docs) @ labels.T)
    return {"ε target": epsilon, "ε spent": spent, "accuracy": held_out, "seconds": seconds}


theirs = [opacus_peft_run(eps) for eps in (*EPSILONS, None)]
for row in theirs:
    print(row)

# %% [markdown]
# ## Side by side

# %%
print(f"zero-shot: {zero_shot:.1%}\n")
print(
    f"{'ε target':>9} | {'lora_func ε':>11} {'accuracy':>9} {'s':>5} | {'Opacus+PEFT ε':>13} {'accuracy':>9} {'s':>5}"
)
for a, b in zip(ours, theirs):
    target = "∞ (none)" if a["ε target"] is None else f"{a['ε target']:g}"
    print(
        f"{target:>9} | {a['ε spent']:>11.3f} {a['accuracy']:>9.1%} {a['seconds']:>5.1f} | "
        f"{b['ε spent']:>13.3f} {b['accuracy']:>9.1%} {b['seconds']:>5.1f}"
    )

# The accountant spends what was asked for, and the model was never touched.
for row in ours[:-1]:
    assert row["ε spent"] <= row["ε target"] * 1.01, row
for key, value in model.state_dict().items():
    assert torch.equal(value, base_state[key]), key
non_private = ours[-1]["accuracy"]
assert non_private > zero_shot, "the non-private run learns the task"
