"""lora_func against PEFT and the ideal on a CUDA GPU: training, inference, launch-bound steps, K adapters,
mixed batches, torch.compile. Run by `nox -s gpu` after the GPU tests (`pytest --device cuda`).

    python benchmarks/bench_gpu.py [--out results/gpu.json] [--budget-s 420] [--sections train launch ...]
    python benchmarks/bench_gpu.py --device cpu --quick     # tiny shapes, few repeats: proves the script runs

Contenders of a section alternate in one process (the shared harness, `benchmarks/harness.py`: CUDA events
around each synchronized call, rotating order, medians); their steps are the shared ones of `benchmarks/steps.py`
and `bench_functional.py`, the launch-bound model `bench_launch.py`'s. Every model is built from a config:
nothing is downloaded.

Sections (a Qwen3-0.6B-shaped model from `Qwen3Config`: hidden 1024, 28 layers, intermediate 3072, 16 query /
8 key-value heads of 128, vocab 151936, tied embeddings; bf16; batch 4 x seq 512; LoRA r=8 alpha=16 on the
seven projections, fp32 leaves as PEFT's):
- train: a training step (forward, LM loss, backward) of the ideal (the frozen base on `inputs_embeds` that
  require grad), lora_func on the base as loaded (`requires_grad=True`), PEFT, and DoRA of both; the peak
  memory of each (CUDA allocator, above what was allocated before the step).
- inference: the base forward; lora_func unmerged; merged, as a copy holding `lf.merge`'s weights and through
  `functional_call`; PEFT unmerged (bench_core.py's contenders and ratios, as the train section's).
- launch: bench_launch.py's deep thin model (24 layers, hidden 128, one row of 16 tokens, AdamW), whose step
  a GPU runs bound by kernel launches and Python: lora_func (base as loaded, and frozen) vs PEFT and the ideal.
- k_adapters: K=8 adapters forward+backward: vmap(grad) over `lf.stack` (default SDPA and SDPA's math backend),
  one `adapter_ids` call on the batch repeated K times, a Python loop, PEFT's set_adapter loop, K x ideal.
- mixed: 8 rows with 8 different adapters, inference: `adapter_ids` vs PEFT's `adapter_names` vs the base.
- compile: a lora_func training step, eager vs `torch.compile(fullgraph=True)` (inductor).
k_adapters, mixed and compile run on a copy of the base with `requires_grad=False`. Each section has a share of
the time budget (the harness stops its rounds at the deadline); one that fails is recorded with its error and
the next runs; the JSON is rewritten after every section. Whether the contenders compute the right thing is
the GPU tests' job (tests/integrations/test_gpu.py); this script only checks that they compute the same loss.

Exit status 0 when every section ran; targets that are not met are reported, not failed.
"""

from __future__ import annotations

import copy
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core  # noqa: E402
import bench_functional  # noqa: E402
import bench_launch  # noqa: E402
import harness  # noqa: E402  (puts this checkout's lora_func first on the path)
import steps  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import lora_func as lf  # noqa: E402

K = 8
SHARES = {"train": 0.2, "inference": 0.08, "launch": 0.12, "k_adapters": 0.2, "mixed": 0.08, "compile": 0.32}
# docs/performance.md's targets (bench_core's and bench_launch's), and the GPU's own for K adapters and mixed batches:
# {ratio: (sense, limit)}.
TARGETS = {
    **{
        name: ("<" if name.startswith("memory") else "≤", limit)
        for name, limit in {**bench_core.TARGETS, **bench_launch.TARGETS}.items()
    },
    "memory: lora_func DoRA / peft DoRA": ("<", 1.0),
    "K adapters: vmap / (K x ideal)": ("≤", 1.10),
    "K adapters: PEFT loop / best lora_func": (">", 1.0),
    "mixed batch: adapter_ids / base": ("≤", 1.05),
    "mixed batch: PEFT adapter_names / adapter_ids": (">", 1.0),
}


def qwen3_06b(device: torch.device, dtype: torch.dtype, quick: bool) -> nn.Module:
    """Qwen3-0.6B's shapes (its config.json on the Hub), or a tiny model of the same architecture for --quick."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shapes = dict(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
    )
    if quick:
        shapes.update(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4)
        shapes.update(num_key_value_heads=2, head_dim=16)
    config = Qwen3Config(
        **shapes,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        use_cache=False,  # no KV cache in any forward: the same work for every contender
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    return model.to(dtype).train()


def lm_batch(rows: int, seq: int, vocab: int, device: torch.device, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed)).to(device)
    return {"input_ids": ids, "labels": ids}


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {
        name: {"median_s": harness.median(s), "min_s": min(s), "n": len(s), "samples_s": s}
        for name, s in samples.items()
        if s
    }


def medians(times: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {name: e["median_s"] for name, e in times.items()}


class Bench:
    """The model, batch and adapters every section shares, and the settings of the run."""

    def __init__(self, device: torch.device, quick: bool, budget_s: float) -> None:
        self.device, self.quick, self.budget_s = device, quick, budget_s
        self.batch_rows, self.seq = (2, 32) if quick else (4, 512)
        self.repeats = 3 if quick else 20
        self.warmup = 1 if quick else 2
        self.base = qwen3_06b(device, torch.bfloat16, quick)  # requires grad everywhere, as a loaded HF model
        self.frozen = copy.deepcopy(self.base).requires_grad_(False)
        self.batch = lm_batch(self.batch_rows, self.seq, self.base.config.vocab_size, device)
        names = steps.projection_names()
        self.lora = lf.init(self.base, lf.LoRAConfig(r=steps.RANK, alpha=steps.ALPHA, target_names=names), seed=0)
        self.dora = lf.init(self.base, lf.DoRAConfig(r=steps.RANK, alpha=steps.ALPHA, target_names=names), seed=0)
        assert len(self.lora.targets) == 7 * self.base.config.num_hidden_layers, len(self.lora.targets)

    def deadline(self, share: float) -> float:
        """A section's deadline (time.monotonic): its share of the budget, from now."""
        return time.monotonic() + share * self.budget_s

    def time(self, contenders: dict[str, Callable[[], object]], share: float, label: str, **kw) -> dict:
        options = dict(repeats=self.repeats, warmup=self.warmup) | kw
        samples = harness.alternate_walls(
            contenders,
            options["repeats"],
            options["warmup"],
            label,
            device=self.device,
            stop_at=self.deadline(0.8 * share),
            min_repeats=1,
        )
        return summarize(samples)

    def setup(self) -> dict[str, Any]:
        c = self.base.config
        return {
            "model": f"Qwen3ForCausalLM from Qwen3Config: hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
            f"intermediate {c.intermediate_size}, heads {c.num_attention_heads}/{c.num_key_value_heads} x "
            f"{c.head_dim}, vocab {c.vocab_size}, tied embeddings",
            "dtype": "bfloat16",
            "base_params": sum(p.numel() for p in self.base.parameters()),
            "adapter_params": self.lora.num_params(),
            "batch": self.batch_rows,
            "seq": self.seq,
            "rank": steps.RANK,
            "alpha": steps.ALPHA,
            "K": K,
            "attention": getattr(c, "_attn_implementation", None),
        }


def section_train(b: Bench) -> dict:
    train, _ = bench_core.train_steps(b.base, b.frozen, b.batch, b.lora, b.dora)
    losses = steps.check_same_loss(train, 2e-2, "bench_gpu")  # bf16: the same loss to its rounding
    memory = {name: harness.peak_bytes(fn, b.device) for name, fn in train.items()}
    times = b.time(train, SHARES["train"], "train")
    ratios = {**bench_core.train_ratios(medians(times)), **bench_core.memory_ratios(memory)}
    return {"losses_at_init": losses, "times": times, "memory_bytes": memory, "ratios": ratios}


def section_inference(b: Bench) -> dict:
    peft = steps.peft_model(b.base).eval()
    b.base.eval()
    try:
        infer = bench_core.inference_steps(b.base, b.lora, peft, {"input_ids": b.batch["input_ids"]})
        times = b.time(infer, SHARES["inference"], "inference", repeats=2 * b.repeats)
    finally:
        b.base.train()
    return {"times": times, "ratios": bench_core.inference_ratios(medians(times))}


def section_launch(b: Bench) -> dict:
    contenders = bench_launch.contenders(b.device)
    times = b.time(contenders, SHARES["launch"], "launch", repeats=5 if b.quick else 60, warmup=2 if b.quick else 10)
    t = medians(times)
    return {
        "setup": f"bench_launch.py's model: {bench_launch.LAYERS} layers, hidden {bench_launch.HIDDEN}, one row of "
        f"{bench_launch.SEQ} tokens, AdamW",
        "times": times,
        "ratios": {
            "launch: lora_func / ideal": t["lora_func"] / t["ideal"],
            "launch: lora_func / peft": t["lora_func"] / t["peft"],
            "launch: lora_func frozen / ideal": t["lora_func frozen"] / t["ideal"],
            "launch: lora_func frozen / peft": t["lora_func frozen"] / t["peft"],
            "launch: peft / ideal": t["peft"] / t["ideal"],
        },
    }


def section_k_adapters(b: Bench) -> dict:
    params = bench_functional.adapters(b.frozen, K)
    contenders = bench_functional.k_adapter_steps(b.frozen, params, b.batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's "performance drop" notes on ops without a batching rule
        memory = {name: harness.peak_bytes(fn, b.device) for name, fn in contenders.items()}
        times = b.time(contenders, SHARES["k_adapters"], "K adapters", repeats=max(2, b.repeats // 4), warmup=1)
    t = medians(times)
    ideal = t["K x ideal"]
    best = min(v for name, v in t.items() if name.startswith("lora_func"))
    return {
        "times": times,
        "memory_bytes": memory,
        "ratios": {
            "K adapters: vmap / (K x ideal)": t["lora_func vmap"] / ideal,
            "K adapters: vmap (SDPA math) / (K x ideal)": t["lora_func vmap, SDPA math backend"] / ideal,
            "K adapters: adapter_ids on K x rows / (K x ideal)": t["lora_func adapter_ids on K x batch rows"] / ideal,
            "K adapters: loop / (K x ideal)": t["lora_func loop"] / ideal,
            "K adapters: PEFT loop / (K x ideal)": t["PEFT set_adapter loop"] / ideal,
            "K adapters: PEFT loop / vmap": t["PEFT set_adapter loop"] / t["lora_func vmap"],
            "K adapters: PEFT loop / best lora_func": t["PEFT set_adapter loop"] / best,
        },
    }


def section_mixed(b: Bench) -> dict:
    params = bench_functional.adapters(b.frozen, K)
    ids = lm_batch(K, b.seq, b.frozen.config.vocab_size, b.device, seed=7)["input_ids"]
    timing = dict(device=b.device, stop_at=b.deadline(0.8 * SHARES["mixed"]), min_repeats=1)
    times = summarize(bench_functional.mixed_batch(b.frozen, params, 2 * b.repeats, ids, **timing))
    t = medians(times)
    return {
        "times": times,
        "ratios": {
            "mixed batch: adapter_ids / base": t["lora_func adapter_ids"] / t["base forward"],
            "mixed batch: PEFT adapter_names / base": t["PEFT adapter_names"] / t["base forward"],
            "mixed batch: PEFT adapter_names / adapter_ids": t["PEFT adapter_names"] / t["lora_func adapter_ids"],
        },
    }


def section_compile(b: Bench) -> dict:
    params = bench_functional.adapters(b.frozen, 1)[0]
    stop_at = b.deadline(0.9 * SHARES["compile"])  # the first, compiling call takes most of the share
    samples, info = bench_functional.compiled_step(
        b.frozen, params, b.batch, b.repeats, device=b.device, stop_at=stop_at, min_repeats=1
    )
    times = summarize(samples)
    t = medians(times)
    return {
        "times": times,
        "compile": info,
        "ratios": {"compile: compiled / eager step": t["compiled step (inductor)"] / t["eager step"]},
    }


SECTIONS: dict[str, Callable[[Bench], dict]] = {
    "train": section_train,
    "inference": section_inference,
    "launch": section_launch,
    "k_adapters": section_k_adapters,
    "mixed": section_mixed,
    "compile": section_compile,
}


def met(value: float, sense: str, limit: float) -> bool:
    return {"<": value < limit, "≤": value <= limit, ">": value > limit}[sense]


def targets(ratios: dict[str, float]) -> dict[str, dict[str, Any]]:
    return {
        name: {"sense": sense, "limit": limit, "ratio": ratios[name], "met": met(ratios[name], sense, limit)}
        for name, (sense, limit) in TARGETS.items()
        if name in ratios
    }


def markdown(result: dict) -> str:
    """The run as markdown: a table per section, then the ratios against their targets (report.py shows it)."""
    setup = result["setup"]
    lines = [
        f"{setup['model']}, {setup['dtype']}, batch {setup['batch']} x seq {setup['seq']}, LoRA r={setup['rank']}; "
        f"{setup['device_name']}, torch {setup['torch']}"
        + (" (quick: tiny shapes, not a measurement)" if setup["quick"] else ""),
        "",
        "| section | status | seconds | note |",
        "|---|---|---:|---|",
    ]
    for name, entry in result["sections"].items():
        note = " ".join(str(entry.get("error", "")).split())[:160]
        lines.append(f"| {name} | {entry['status']} | {entry['elapsed_s']:.1f} | {note} |")
    for name, entry in result["sections"].items():
        times, memory = entry.get("times"), entry.get("memory_bytes", {})
        if not times:
            continue
        lines += ["", f"| {name} | median ms | min ms | n | peak MiB |", "|---|---:|---:|---:|---:|"]
        for contender, e in times.items():
            mib = f"{memory[contender] / 2**20:.1f}" if contender in memory else ""
            lines.append(f"| {contender} | {1e3 * e['median_s']:.2f} | {1e3 * e['min_s']:.2f} | {e['n']} | {mib} |")
    lines += ["", "| ratio | value | target | |", "|---|---:|---:|---|"]
    for name, value in result["ratios"].items():
        target = result["targets"].get(name)
        shown = (
            f"{target['sense']} {target['limit']:.2f} | {'met' if target['met'] else '**not met**'}"
            if target
            else " | "
        )
        lines.append(f"| {name} | {value:.3f} | {shown} |")
    info = result["sections"].get("compile", {}).get("compile")
    if info:
        lines.append(
            f"\ncompile: {info['graph_count']} graph(s), {info['graph_break_count']} graph break(s), first compiled "
            f"call {info['first_compiled_call_s']:.1f} s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__, "results/gpu.json", threads=None)  # --quick: tiny shapes, few repeats
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu with --quick")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="all sections together, seconds (420; 60 with --quick)"
    )
    parser.add_argument("--sections", nargs="+", choices=tuple(SECTIONS), default=tuple(SECTIONS))
    args = harness.parse(parser, argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU machine, or use --device cpu --quick")
    if device.type != "cuda" and not args.quick:
        parser.error("the full sizes are for a GPU: on the CPU, use --quick")

    if args.budget_s is None:
        args.budget_s = 60.0 if args.quick else 420.0
    if device.type == "cpu":
        torch.set_num_threads(2)  # as the CPU benchmarks: a machine shared with other jobs
    bench = Bench(device, args.quick, args.budget_s)
    if args.repeats:
        bench.repeats = args.repeats
    result: dict[str, Any] = {
        "setup": {
            **bench.setup(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "quick": args.quick,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "lora_func": str(Path(lf.__file__).parent),
            "python": platform.python_version(),
            "budget_s": args.budget_s,
        },
        "sections": {},
        "ratios": {},
        "targets": {},
    }

    def write() -> None:
        result["targets"] = targets(result["ratios"])
        harness.write_json(result, args.out, default=str)  # after every section: what ran is kept

    for name in args.sections:
        print(f"[bench_gpu] {name} ...", file=sys.stderr, flush=True)
        start = time.monotonic()
        try:
            entry = {"status": "ok", **SECTIONS[name](bench)}
        except Exception as e:  # one section's failure is recorded; the others still run
            entry = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        entry["elapsed_s"] = time.monotonic() - start
        result["sections"][name] = entry
        result["ratios"].update(entry.get("ratios", {}))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write()
        print(f"[bench_gpu] {name}: {entry['status']} ({entry['elapsed_s']:.1f} s)", file=sys.stderr, flush=True)
    print(markdown(result))
    return 0 if all(e["status"] == "ok" for e in result["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
