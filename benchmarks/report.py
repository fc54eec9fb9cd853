"""Write `docs/benchmarks.md` and its plots from the JSON the benchmark scripts wrote.

    python benchmarks/report.py [--results results] [--docs docs]

Reads `bench_core.json`, `launch.json`, `functional.json`, `scaling.json`, `calls.json` and `methods.json` (and
`gpu.json` when a GPU run, `nox -s gpu`, left one) from `--results`; writes `benchmarks.md` and `img/*.png` under
`--docs`. A missing input is reported in the page as not run, never filled in.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def version(name: str) -> str:
    try:
        from importlib.metadata import version as v

        return v(name)
    except Exception:
        return "not installed"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_section(core: dict | None) -> list[str]:
    threads = core["setup"]["threads"] if core else "?"
    return [
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}; "
        f"torch threads: {threads}",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{version('transformers')}, peft {version('peft')}, lora_func {version('lora_func')}",
        "- bench model (docs/performance.md): Qwen3ForCausalLM from config, hidden 512, 6 layers, intermediate 1408, "
        "vocab 4096, 8/4 heads of 64 (~22M parameters), random weights; batch 4; LoRA on all seven "
        "projections of every layer.",
        "- method: contenders run alternately in one process, the order rotating each repeat (one harness, "
        "`benchmarks/harness.py`); medians after warmup; peak memory from torch's profiler (bytes allocated "
        "above what was resident before the step).",
    ]


def status(ratio: float, limit: float, strict: bool = False) -> str:
    met = ratio < limit if strict else ratio <= limit
    return "met" if met else "**not met**"


def core_section(core: dict, img: Path) -> list[str]:
    t, i, mem = core["train_s"], core["inference_s"], core["peak_memory_bytes"]
    ideal, base = t["ideal"]["median_wall"], i["base"]["median_wall"]
    out = [
        f"Sequence {core['setup']['seq']}, r = {core['setup']['rank']}, alpha = {core['setup']['alpha']}; "
        f"{core['setup']['repeats']} timed repeats per contender.",
        "",
        "| training step | median s | × ideal | peak MiB |",
        "|---|---:|---:|---:|",
    ]
    for name, row in t.items():
        w = row["median_wall"]
        out.append(f"| {name} | {w:.4f} | {w / ideal:.3f} | {mem[name] / 2**20:.1f} |")
    out += ["", "| inference forward (no grad) | median s | × base |", "|---|---:|---:|"]
    for name, row in i.items():
        out.append(f"| {name} | {row['median_wall']:.4f} | {row['median_wall'] / base:.3f} |")
    out += ["", "| ratio | measured | target | |", "|---|---:|---:|---|"]
    targets = core["targets"]
    for name, value in core["ratios"].items():
        target = targets.get(name)
        if target:
            strict = name.startswith("memory")
            out.append(
                f"| {name} | {value:.3f} | {'<' if strict else '≤'} {target['limit']:.2f} "
                f"| {status(value, target['limit'], strict)} |"
            )
        else:
            out.append(f"| {name} | {value:.3f} | | |")
    plot_core(core, img / "bench_core.png")
    out += ["", "![training step and inference, relative to the limit](img/bench_core.png)"]
    return out


def launch_section(launch: dict) -> list[str]:
    setup, t = launch["setup"], launch["train_s"]
    ideal, peft = t["ideal"]["median_wall"], t["peft"]["median_wall"]
    ideal_cpu, peft_cpu = t["ideal"]["median_cpu"], t["peft"]["median_cpu"]
    out = [
        f"{setup['model']}; 1 row of {setup['seq']} tokens, LoRA r = {setup['rank']} on {setup['targets']} targets, "
        f"forward + backward + AdamW, {setup['threads']} thread; medians of {setup['repeats']}. A CPU proxy for "
        "training on a GPU, where such a step is bound by per-op overhead, not FLOPs. `lora_func`: the base as HF "
        "loads it (`requires_grad=True`); `lora_func frozen`: the base frozen by hand.",
        "",
        "| launch-bound step | median ms | × ideal | × PEFT | CPU ms | × ideal (CPU) | × PEFT (CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in t.items():
        w, c = row["median_wall"], row["median_cpu"]
        out.append(
            f"| {name} | {1000 * w:.2f} | {w / ideal:.3f} | {w / peft:.3f} "
            f"| {1000 * c:.2f} | {c / ideal_cpu:.3f} | {c / peft_cpu:.3f} |"
        )
    out += ["", "| ratio | measured | CPU time | target | |", "|---|---:|---:|---:|---|"]
    for name, value in launch["ratios"].items():
        cpu = launch["ratios_cpu_time"][name]
        target = launch["targets"].get(name)
        limit = f"≤ {target['limit']:.2f} | {status(value, target['limit'])}" if target else " | "
        out.append(f"| {name} | {value:.3f} | {cpu:.3f} | {limit} |")
    return out


def functional_section(fn: dict, img: Path) -> list[str]:
    setup = fn["setup"]
    out = [
        f"K = {setup['K']} adapters, batch {setup['batch']}, sequence {setup['seq']}, {setup['lora']}; "
        f"medians of {setup['repeats']}.",
        "",
        "| section | contender | median ms | min ms |",
        "|---|---|---:|---:|",
    ]
    for section, entries in fn["results"].items():
        for name, e in entries.items():
            out.append(f"| {section} | {name} | {1000 * e['median_s']:.1f} | {1000 * e['min_s']:.1f} |")
    out += ["", "| ratio | measured | target | |", "|---|---:|---:|---|"]
    for name, value in fn["ratios"].items():
        target = fn["targets"].get(name)
        shown = f"≤ {target['target']:.2f} | {status(value, target['target'])}" if target else " | "
        out.append(f"| {name} | {value:.3f} | {shown} |")
    if fn.get("compile"):
        c = fn["compile"]
        out.append(
            f"\ntorch.compile: {c['graph_count']} graph(s), {c['graph_break_count']} graph break(s); first compiled "
            f"call {c['first_compiled_call_s']:.1f} s."
        )
    plot_functional(fn, img / "bench_functional.png")
    out += ["", "![functional benchmarks](img/bench_functional.png)"]
    return out


def scaling_section(sc: dict, img: Path) -> list[str]:
    out = []
    for sweep, key, label in (("rank", "r", "rank r (sequence 128)"), ("seq", "seq", "sequence length (r = 8)")):
        rows = sc[sweep]
        out += [
            f"**{label}**",
            "",
            f"| {key} | ideal s | lora_func s | PEFT s | lora_func × ideal | PEFT × ideal | lora_func MiB | "
            "PEFT MiB | memory lora_func / PEFT |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            out.append(
                f"| {r[key]} | {r['ideal_s']:.4f} | {r['lora_func_s']:.4f} | {r['peft_s']:.4f} "
                f"| {r['lora_func_s'] / r['ideal_s']:.3f} | {r['peft_s'] / r['ideal_s']:.3f} "
                f"| {r['lora_func_peak_bytes'] / 2**20:.1f} | {r['peft_peak_bytes'] / 2**20:.1f} "
                f"| {r['lora_func_peak_bytes'] / r['peft_peak_bytes']:.3f} |"
            )
        out.append("")
        plot_scaling(rows, key, label, img / f"scaling_{sweep}.png")
        out += [f"![step time and peak memory against {label}](img/scaling_{sweep}.png)", ""]
    return out


def calls_section(calls: dict) -> list[str]:
    setup = calls["setup"]
    out = [
        f"Medians of {setup['repeats']} ({setup['threads']} threads); per-call samples time "
        f"{setup['calls_per_sample']} calls each; generation: {setup['new_tokens']} new tokens, greedy, KV cache.",
        "",
        "| section | contender | median ms |",
        "|---|---|---:|",
    ]
    for section, entries in calls["results"].items():
        for name, e in entries.items():
            out.append(f"| {section} | {name} | {1000 * e['median_s']:.2f} |")
    out += ["", "| ratio | measured | target | |", "|---|---:|---:|---|"]
    for name, value in calls["ratios"].items():
        target = calls["targets"].get(name)
        if target is None:
            out.append(f"| {name} | {value:.3f} | | |")
        else:
            sense, met = target.get("sense", "≤"), "met" if target["met"] else "**not met**"
            out.append(f"| {name} | {value:.3f} | {sense} {target['target']:.2f} | {met} |")
    return out


def methods_section(methods: dict) -> list[str]:
    from bench_methods import markdown  # benchmarks/bench_methods.py renders its own table

    setup = methods["setup"]
    load = setup.get("load_average")
    machine = "" if load is None else f"; load average {load:.1f} on {setup['cpus']} CPUs (wall time counts other jobs)"
    return [
        f"Each method with a PEFT mapping, configured as the MiniLM demo configures it (its `Recipe`), on the seven "
        f"projections of every layer (LN Tuning: the norms; Trainable Tokens: the input embedding); both hold the "
        f"same leaves (`lf.to_peft`, then PEFT's `from_pretrained`) and compute the same loss. Training step: forward, "
        f"loss, backward, no optimizer; sequence {setup['seq']}, {setup['threads']} thread(s), medians of "
        f"{setup['repeats']} alternating repeats{machine}. Limit (docs/performance.md): step ≤ "
        f"{methods['limit']:.1f} × PEFT's.",
        "",
        markdown(methods),
    ]


def gpu_section(gpu: dict | None) -> list[str]:
    if gpu is None:
        return [
            "Not run yet: no GPU was available to the sessions that produced this page. `nox -s gpu` runs the "
            "GPU tests and `benchmarks/bench_gpu.py` (its sections share a 7-minute budget), which writes "
            "`results/gpu.json`; re-running this report then adds its figures here with their date."
        ]
    from bench_gpu import markdown  # benchmarks/bench_gpu.py renders its own report

    setup = gpu.get("setup", {})
    when, device = setup.get("date", "an unrecorded date"), setup.get("device_name", "an unrecorded device")
    return [f"Run on {when}, {device}.", "", markdown(gpu)]  # markdown says whether it was a --quick run


# -- plots ----------------------------------------------------------------------------------------


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_core(core: dict, path: Path) -> None:
    plt = pyplot()
    t, i = core["train_s"], core["inference_s"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(t)
    a.bar(names, [t[n]["median_wall"] / t["ideal"]["median_wall"] for n in names], color="tab:blue")
    a.axhline(1.10, color="tab:red", ls="--", lw=1, label="target 1.10 × ideal")
    a.set(ylabel="step time / ideal", title="training step")
    a.tick_params(axis="x", rotation=30)
    a.legend(fontsize="small")
    names = list(i)
    b.bar(names, [i[n]["median_wall"] / i["base"]["median_wall"] for n in names], color="tab:green")
    b.axhline(1.03, color="tab:red", ls="--", lw=1, label="target unmerged 1.03 × base")
    b.set(ylabel="forward time / base", title="inference")
    b.tick_params(axis="x", rotation=30)
    b.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_functional(fn: dict, path: Path) -> None:
    plt = pyplot()
    sections = fn["results"]
    fig, axes = plt.subplots(1, len(sections), figsize=(5 * len(sections), 4.5), squeeze=False)
    for ax, (section, entries) in zip(axes[0], sections.items()):
        names = list(entries)
        ax.barh(names, [1000 * e["median_s"] for e in entries.values()], color="tab:purple")
        ax.set(xlabel="median ms", title=section.replace("_", " "))
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(rows: list[dict], key: str, label: str, path: Path) -> None:
    plt = pyplot()
    x = [r[key] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("ideal", ":"), ("lora_func", "-o"), ("peft", "-s")):
        a.plot(x, [r[f"{name}_s"] for r in rows], style, label=name)
        b.plot(x, [r[f"{name}_peak_bytes"] / 2**20 for r in rows], style, label=name)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel(label)
        ax.legend(fontsize="small")
    a.set(ylabel="training step, median s", title="step time")
    b.set(ylabel="peak MiB during the step", title="peak memory")
    if key == "seq":
        a.set_yscale("log")
        b.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    img = args.docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    core = load(args.results / "bench_core.json")
    launch = load(args.results / "launch.json")
    fn = load(args.results / "functional.json")
    sc = load(args.results / "scaling.json")
    gpu = load(args.results / "gpu.json")
    calls = load(args.results / "calls.json")
    methods = load(args.results / "methods.json")

    page = [
        "# Benchmarks",
        "",
        "Written by `nox -s bench` (`benchmarks/report.py`); do not edit by hand. Targets are the "
        "limits-and-targets table of docs/performance.md: each measure against what a zero-cost adapter would take.",
        "",
        "## Machine",
        "",
        *machine_section(core),
        "",
        "## LoRA and DoRA training, memory, inference (`benchmarks/bench_core.py`)",
        "",
        *(core_section(core, img) if core else ["Not run (no results/bench_core.json)."]),
        "",
        "## Launch-bound training step (`benchmarks/bench_launch.py`)",
        "",
        *(launch_section(launch) if launch else ["Not run (no results/launch.json)."]),
        "",
        "## K adapters, mixed batches, torch.compile (`benchmarks/bench_functional.py`)",
        "",
        *(functional_section(fn, img) if fn else ["Not run (no results/functional.json)."]),
        "",
        "## How cost grows with rank and sequence length (`benchmarks/bench_scaling.py`)",
        "",
        *(scaling_section(sc, img) if sc else ["Not run (no results/scaling.json)."]),
        "",
        "## Per-call cost and generation (`benchmarks/bench_calls.py`)",
        "",
        *(calls_section(calls) if calls else ["Not run (no results/calls.json)."]),
        "",
        "## Each method against PEFT (`benchmarks/bench_methods.py`)",
        "",
        *(methods_section(methods) if methods else ["Not run (no results/methods.json)."]),
        "",
        "## GPU (`nox -s gpu`, `benchmarks/bench_gpu.py`)",
        "",
        *gpu_section(gpu),
        "",
    ]
    (args.docs / "benchmarks.md").write_text("\n".join(page))
    print(f"wrote {args.docs / 'benchmarks.md'} and plots in {img}", file=sys.stderr)


if __name__ == "__main__":
    main()
