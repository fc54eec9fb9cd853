"""Where a lora_func LoRA training step spends its time beyond the ideal (see bench_core.py).

    python benchmarks/profile_core.py [--threads 1] [--repeats 4]

Three views, on the bench model of bench_core.py:
1. Steps, alternated and timed by process CPU time (min and median): ideal; lora_func with LoRA's
   forward replaced by `y` unchanged on inputs that require grad (all of `apply`'s machinery, no adapter
   math: dispatchers, the detaching mode over base parameters, cleanup); lora_func LoRA; PEFT.
2. `apply`'s fixed costs per call, alternated by the shared harness: the survey of the model, the structure
   check, resolving targets, building the injection and registering and removing its dispatchers, the
   detached-parameter table.
3. Operators the lora_func step calls more often than the ideal (profiler, grouped by input shapes,
   each side the min over repeats): the adapter's matmuls, adds, casts, the autograd.Function's own
   overhead, and the extra accumulation of input gradients.
Use `--threads 1` on a shared machine (see bench_core.py on clocks).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's lora_func

import bench_core as bc  # noqa: E402
import harness  # noqa: E402
import steps as st  # noqa: E402

import lora_func as lf  # noqa: E402
from lora_func.variants import REGISTRY  # noqa: E402


def machinery_step(model, params, batch):
    """lf.apply with an adapter that returns the base output unchanged, on inputs_embeds that require grad."""
    embed = model.get_input_embeddings()
    lora = REGISTRY["lora"]

    def step():
        x = embed(batch["input_ids"]).detach().requires_grad_()
        REGISTRY["lora"] = lora._replace(forward=lambda x, y, leaves, site: y)
        try:
            loss = lf.apply(model, params, {"inputs_embeds": x, "labels": batch["labels"]}).loss
        finally:
            REGISTRY["lora"] = lora
        loss.backward()

    return step


def fixed_costs(model, params, batch, repeats: int = 100) -> dict[str, float]:
    """`apply`'s costs per call besides running the model (lora_func/_inject/): median ms of each, alternated
    by the shared harness."""
    from lora_func import _inject, _sites, _structure

    def hooks_on_and_off():
        with _inject.Injection(model, params, None, "apply"):
            pass

    costs = {
        "survey of the model (one walk)": lambda: _inject.survey(model),
        "structure check": lambda: _structure.check(params, "apply"),
        "resolve targets": lambda: _sites.resolve_sites(model, params, "apply"),
        "whole injection: build, register and remove the dispatchers": hooks_on_and_off,
        "detached base-parameter table": lambda: {id(p): p.detach() for p in model.parameters() if p.requires_grad},
    }
    medians = harness.medians(harness.alternate(costs, repeats, 1, "fixed costs"))
    return {name: 1e3 * s for name, s in medians.items()}


def extra_operators(ideal, adapted, repeats: int) -> list[tuple[float, str, int, str]]:
    """(ms, op, calls, shapes) for operators the adapted step calls more often than the ideal one: the
    difference of self CPU time (each side the min over `repeats` profiles) and of call counts."""
    from torch.profiler import ProfilerActivity, profile

    def table(fn) -> dict[tuple[str, str], tuple[float, int]]:
        best: dict[tuple[str, str], tuple[float, int]] = {}
        for _ in range(repeats):
            gc.collect()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                fn()
            for e in prof.key_averages(group_by_input_shape=True):
                key = (e.key, str(e.input_shapes))
                ms = e.self_cpu_time_total / 1e3
                best[key] = (min(best[key][0], ms), e.count) if key in best else (ms, e.count)
        return best

    base, ours = table(ideal), table(adapted)
    rows = []
    for key, (ms, n) in ours.items():
        base_ms, base_n = base.get(key, (0.0, 0))
        if n > base_n:
            rows.append((ms - base_ms, key[0], n - base_n, key[1]))
    return sorted(rows, reverse=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = bc.bench_model().train()
    batch = bc.bench_batch(model.config.vocab_size)
    frozen = copy.deepcopy(model).requires_grad_(False)
    params = lf.init(model, lf.LoRAConfig(r=st.RANK, alpha=st.ALPHA), seed=0)
    steps = {
        "ideal": st.ideal_step(frozen, batch),
        "lora_func machinery only": machinery_step(model, params, batch),
        "lora_func LoRA": st.lora_func_step(model, params, batch),
        "peft LoRA": st.peft_step(st.peft_model(model).train(), batch),
    }
    times = harness.alternate(steps, args.repeats * 3, 1, "steps")
    ideal_min, ideal_med = min(times["ideal"]["cpu"]), statistics.median(times["ideal"]["cpu"])
    print(f"lora_func from {Path(lf.__file__).parent}\n")
    print(f"## training step, process CPU time, {args.threads} thread(s)\n")
    print("| step | min s | × ideal | median s | × ideal |\n|---|---:|---:|---:|---:|")
    for name, t in times.items():
        lo, med = min(t["cpu"]), statistics.median(t["cpu"])
        print(f"| {name} | {lo:.4f} | {lo / ideal_min:.3f} | {med:.4f} | {med / ideal_med:.3f} |")

    print("\n## apply's fixed costs per call\n\n| part | median ms |\n|---|---:|")
    for name, ms in fixed_costs(model, params, batch).items():
        print(f"| {name} | {ms:.3f} |")

    rows = extra_operators(steps["ideal"], steps["lora_func LoRA"], args.repeats)
    total = sum(ms for ms, *_ in rows)
    print(f"\n## operators the lora_func step calls more often than the ideal (profiled, {total:.1f} ms)\n")
    print("| extra ms | op | extra calls | input shapes |\n|---:|---|---:|---|")
    for ms, op, n, shapes in rows[: args.top]:
        print(f"| {ms:.2f} | {op} | {n} | {shapes[:70]} |")


if __name__ == "__main__":
    main()
