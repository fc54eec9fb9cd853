"""What only a functional adapter library does, timed against PEFT and against the zero-cost limit.

    python benchmarks/bench_functional.py --out results/functional.json [--repeats 7] [--sections k mixed compile]

Bench model (docs/performance.md): Qwen3-shaped from config, hidden 512, 6 layers, intermediate 1408, vocab 4096,
seq 128, batch 4, LoRA r=8 on all seven projections, 2 threads, base weights frozen. Contenders of a
section run in one process, alternating (the order rotates each round); figures are medians.

1. K=8 adapters, forward+backward: `vmap(grad)` over `lf.stack`ed adapters (with the default SDPA
   kernel, which vmap runs as a loop over K, and with SDPA's math backend), the same K gradients from
   one `adapter_ids` call on the batch repeated K times (no vmap over the model), a Python loop of
   `lf.apply` + backward, PEFT switching adapters with `set_adapter`, and the limit K x ideal (ideal:
   base forward + input-gradient backward, no adapter; timed as K such calls).
2. A mixed batch, 8 rows with 8 different adapters, inference: `lf.apply(..., adapter_ids=...)`, PEFT's
   `adapter_names`, and the base forward on the same rows (the limit).
3. A lora_func training step (forward, loss, backward), eager vs `torch.compile` (inductor), with the
   graph breaks `torch._dynamo.explain` counts.

Prints a markdown table and writes the figures, ratios and targets as JSON.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core  # noqa: E402
import harness  # noqa: E402

import lora_func as lf  # noqa: E402

PROJECTIONS = (r"q_proj$", r"k_proj$", r"v_proj$", r"o_proj$", r"gate_proj$", r"up_proj$", r"down_proj$")
K = 8
SEQ, BATCH, VOCAB = 128, 4, 4096


def bench_model() -> torch.nn.Module:
    """bench_core's model (docs/performance.md), in train mode with its base frozen, as in any adapter training."""
    model = bench_core.bench_model(max_positions=SEQ).train()
    model.requires_grad_(False)
    return model


def make_batch(rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def adapters(model: torch.nn.Module, count: int) -> list[lf.Params]:
    """`count` LoRA adapters with nonzero B (a trained adapter, not the identity)."""
    cfg = lf.LoRAConfig(r=8, alpha=16, target_names=PROJECTIONS)
    out = []
    for seed in range(count):
        params = lf.init(model, cfg, seed=seed)
        gen = torch.Generator().manual_seed(100 + seed)
        entries = {
            path: {
                k: (v.detach() + 0.01 * torch.randn(v.shape, generator=gen).to(v)).requires_grad_()
                for k, v in e.items()
            }
            for path, e in params.items()
        }
        out.append(params.replace(entries))
    return out


def peft_model(model: torch.nn.Module, params: list[lf.Params]) -> torch.nn.Module:
    """A PEFT copy of `model` holding the same adapters as `adapter0..adapterK-1`."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=[p.rstrip("$") for p in PROJECTIONS], lora_dropout=0.0)
    peft = get_peft_model(copy.deepcopy(model), cfg, adapter_name="adapter0")
    for k in range(1, len(params)):
        peft.add_adapter(f"adapter{k}", cfg)
    with torch.no_grad():
        for k, p in enumerate(params):
            for target in p.targets:
                layer = peft.base_model.model.get_submodule(target.path)
                layer.lora_A[f"adapter{k}"].weight.copy_(p[target.path]["A"])
                layer.lora_B[f"adapter{k}"].weight.copy_(p[target.path]["B"])
    peft.set_adapter("adapter0")
    return peft


def k_adapters(model, params, batch, repeats: int, **timing) -> dict[str, list[float]]:
    """Section 1: K adapters, forward+backward; `timing` goes to `harness.alternate` (device, stop_at)."""
    return harness.alternate_walls(k_adapter_steps(model, params, batch), repeats, label="K adapters", **timing)


def k_adapter_steps(model, params, batch) -> dict[str, Callable[[], object]]:
    """Section 1's contenders: each computes the K adapters' gradients on `batch` (the ideal: K base passes)."""
    stacked = lf.stack(params)
    trainable, frozen = lf.split(stacked)
    peft = peft_model(model, params)
    embed = model.get_input_embeddings()

    def loss_of(t):
        return lf.apply(model, lf.combine(t, frozen), batch).loss

    def vmapped():
        grads, losses = torch.func.vmap(torch.func.grad_and_value(loss_of))(trainable)
        return grads

    def vmapped_math_sdpa():
        # SDPA's CPU flash kernel has no vmap batching rule (vmap loops over K there); the math backend has.
        with sdpa_kernel([SDPBackend.MATH]):
            return vmapped()

    k, rows = len(params), batch["input_ids"].shape[0]
    repeated = {name: t.repeat(k, *[1] * (t.dim() - 1)) for name, t in batch.items()}
    ids = torch.arange(k, device=batch["input_ids"].device).repeat_interleave(rows)

    def mixed_rows():
        # The same K gradients without vmap over the model: the batch repeated K times, block k of rows
        # running adapter k. HF's loss is the mean over all K blocks, so x K gives each adapter its own mean.
        (lf.apply(model, stacked, repeated, adapter_ids=ids).loss * k).backward()
        for _, _, t in stacked.leaves():
            t.grad = None

    def loop():
        for p in params:
            lf.apply(model, p, batch).loss.backward()
            for _, _, t in p.leaves():
                t.grad = None

    def peft_loop():
        for k in range(len(params)):
            peft.set_adapter(f"adapter{k}")
            peft(**batch).loss.backward()
        peft.zero_grad(set_to_none=True)

    def ideal():
        for _ in range(len(params)):
            x = embed(batch["input_ids"]).detach().requires_grad_()
            model(inputs_embeds=x, labels=batch["labels"]).loss.backward()

    return {
        "K x ideal": ideal,
        "lora_func vmap": vmapped,
        "lora_func vmap, SDPA math backend": vmapped_math_sdpa,
        "lora_func adapter_ids on K x batch rows": mixed_rows,
        "lora_func loop": loop,
        "PEFT set_adapter loop": peft_loop,
    }


def mixed_batch(model, params, repeats: int, ids: torch.Tensor | None = None, **timing) -> dict[str, list[float]]:
    """Section 2: one batch whose rows use different adapters, inference; `ids` are the rows' tokens (default:
    one row of SEQ tokens per adapter) and `timing` goes to `harness.alternate` (device, stop_at)."""
    rows = len(params)
    batch = {"input_ids": make_batch(rows, seed=1)["input_ids"] if ids is None else ids}
    stacked = lf.stack(params)
    ids = torch.arange(rows, device=batch["input_ids"].device)
    peft = peft_model(model, params)
    names = [f"adapter{k}" for k in range(rows)]

    model.eval()  # PEFT refuses `adapter_names` in training mode; no dropout here anyway
    peft.eval()

    def base():
        with torch.no_grad():
            model(**batch)

    def lora_func():
        with torch.no_grad():
            lf.apply(model, stacked, batch, adapter_ids=ids)

    def peft_mixed():
        with torch.no_grad():
            peft(**batch, adapter_names=names)

    try:
        return harness.alternate_walls(
            {"base forward": base, "lora_func adapter_ids": lora_func, "PEFT adapter_names": peft_mixed},
            repeats,
            label="mixed batch",
            **timing,
        )
    finally:
        model.train()


def compiled_step(model, params, batch, repeats: int, **timing) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Section 3: eager vs inductor-compiled training step (compiled forward+loss, AOT-compiled backward);
    `timing` goes to `harness.alternate` (device, stop_at)."""
    trainable, frozen = lf.split(params)
    leaves = lf.trainable_leaves(params)

    def loss_fn(t, b):
        return lf.apply(model, lf.combine(t, frozen), b).loss

    explained = torch._dynamo.explain(loss_fn)(trainable, batch)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    start = time.perf_counter()
    compiled(trainable, batch).backward()
    harness.synchronize(timing.get("device"))
    compile_s = time.perf_counter() - start

    def eager():
        loss_fn(trainable, batch).backward()
        for t in leaves:
            t.grad = None

    def inductor():
        compiled(trainable, batch).backward()
        for t in leaves:
            t.grad = None

    info = {
        "graph_count": explained.graph_count,
        "graph_break_count": explained.graph_break_count,
        "first_compiled_call_s": compile_s,
    }
    return harness.alternate_walls(
        {"eager step": eager, "compiled step (inductor)": inductor}, repeats, label="compile", **timing
    ), info


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, object]]:
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "samples_s": s} for name, s in samples.items()}


def main() -> None:
    parser = harness.arguments(__doc__, "results/functional.json", repeats=7)
    sections = ("k", "mixed", "compile")
    parser.add_argument("--sections", nargs="+", choices=sections, default=sections, help="which sections to run")
    args = harness.parse(parser)
    if args.quick:
        args.repeats = 2
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
    model = bench_model()
    params = adapters(model, K)
    batch = make_batch(BATCH)

    results: dict[str, dict] = {}
    compile_info = None

    def record(section: str, samples: dict[str, list[float]]) -> None:
        results[section] = summarize(samples)
        shown = ", ".join(f"{name} {1000 * e['median_s']:.0f} ms" for name, e in results[section].items())
        print(f"{section}: {shown}", flush=True)

    if "k" in args.sections:
        record("k_adapters_fwd_bwd", k_adapters(model, params, batch, args.repeats))
    if "mixed" in args.sections:
        record("mixed_batch_inference", mixed_batch(model, params, args.repeats))
    if "compile" in args.sections:
        samples, compile_info = compiled_step(model, params[0], batch, args.repeats)
        record("compiled_training_step", samples)

    def median(section: str, name: str) -> float:
        return results[section][name]["median_s"]

    def ratio(section: str, name: str, reference: str) -> float | None:
        if section not in results:
            return None
        return median(section, name) / median(section, reference)

    k, mixed, step = "k_adapters_fwd_bwd", "mixed_batch_inference", "compiled_training_step"
    ratios = {
        "vmap / (K x ideal)": ratio(k, "lora_func vmap", "K x ideal"),
        "vmap (SDPA math) / (K x ideal)": ratio(k, "lora_func vmap, SDPA math backend", "K x ideal"),
        "adapter_ids on K x rows / (K x ideal)": ratio(k, "lora_func adapter_ids on K x batch rows", "K x ideal"),
        "loop / (K x ideal)": ratio(k, "lora_func loop", "K x ideal"),
        "PEFT loop / (K x ideal)": ratio(k, "PEFT set_adapter loop", "K x ideal"),
        "PEFT loop / vmap": ratio(k, "PEFT set_adapter loop", "lora_func vmap"),
        "adapter_ids / base": ratio(mixed, "lora_func adapter_ids", "base forward"),
        "PEFT adapter_names / base": ratio(mixed, "PEFT adapter_names", "base forward"),
        "PEFT adapter_names / adapter_ids": ratio(mixed, "PEFT adapter_names", "lora_func adapter_ids"),
        "compiled / eager step": ratio(step, "compiled step (inductor)", "eager step"),
    }
    ratios = {name: value for name, value in ratios.items() if value is not None}
    targets = {}
    for name, target in (("vmap / (K x ideal)", 1.10), ("adapter_ids / base", 1.05)):
        if name in ratios:
            targets[name] = {"target": target, "met": ratios[name] <= target}
    if compile_info is not None:
        targets["graph breaks"] = {"target": 0, "met": compile_info["graph_break_count"] == 0}

    print(f"\n## lora_func functional benchmarks (K={K}, batch {BATCH}, seq {SEQ}, medians of {args.repeats})\n")
    print("| section | contender | median (ms) | min (ms) |")
    print("|---|---|---:|---:|")
    for section, entries in results.items():
        for name, entry in entries.items():
            print(f"| {section} | {name} | {1000 * entry['median_s']:.1f} | {1000 * entry['min_s']:.1f} |")
    harness.print_ratios(ratios, targets)
    if compile_info is not None:
        print(
            f"\ncompile: {compile_info['graph_count']} graph(s), {compile_info['graph_break_count']} graph break(s), "
            f"first compiled call {compile_info['first_compiled_call_s']:.1f} s"
        )

    report = {
        "setup": {
            "model": "Qwen3 from config: hidden 512, 6 layers, intermediate 1408, vocab 4096, 8 heads / 4 kv heads",
            "batch": BATCH,
            "seq": SEQ,
            "K": K,
            "lora": "r=8, alpha=16, q/k/v/o/gate/up/down",
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
        },
        "env": {
            "torch": torch.__version__,
            "lora_func": lf.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "results": results,
        "ratios": ratios,
        "targets": targets,
        "compile": compile_info,
    }
    harness.write_json(report, args.out)


if __name__ == "__main__":
    main()
