"""Core benchmark: lora_func LoRA against PEFT and against a zero-cost adapter, on the bench model.

    python benchmarks/bench_core.py [--quick] [--out results/bench_core.json]

Bench model (docs/performance.md, "Performance"): a randomly initialised Qwen3ForCausalLM, hidden 512, 6 layers,
intermediate 1408, vocab 4096, 8 query / 4 key-value heads of 64 (~22M parameters); batch 4 × seq 128
with the LM loss; LoRA r=8, alpha=16 on all seven projections of every layer; 2 threads.

Contenders share one process and one set of base weights (deep copies), and are timed alternately by
the shared harness (`benchmarks/harness.py`: rotating order, warmup, `gc.collect()` outside the timing,
medians); the steps are the shared ones of `benchmarks/steps.py`.

Training step = forward + loss + backward + zeroing the adapter gradients (set to None), with no
optimizer step for anyone:
- ideal: the frozen base run on `inputs_embeds` that require grad, so backward computes the input
  gradient through every layer and no weight gradient: what a zero-cost adapter would take.
- lora_func: `lf.apply` on the base model with its parameters left at `requires_grad=True`, as a
  freshly loaded HF model has them (lora_func must not compute base gradients all the same).
- peft: `get_peft_model` with the same LoRA config (`lora_dropout=0`), which freezes its base copy.
- DoRA rows (lora_func DoRA, PEFT `use_dora=True`) only when `lf.DoRAConfig` exists.

Inference (no_grad, eval mode, no labels): the base forward; lora_func unmerged (`lf.apply`); merged, as
deployed (a copy of the model holding the weights from `lf.merge`, computed once outside the timing) and
without a copy (`functional_call` with those weights, which pays for swapping them in on every call);
PEFT unmerged.
At init every adapter is the identity (B = 0), which does not change the work done; the script checks
that all contenders compute the same loss before timing them.

Clocks: wall time (the docs/performance.md measure) and process CPU time (all threads) are both recorded. On a
machine shared with other jobs, wall time at 2 threads mostly measures the other jobs, and OpenMP's
spin-waiting inflates CPU time too; `--threads 1` and the CPU-time columns are then the better guide
to relative cost, and the 2-thread wall figures should be re-run on a quiet machine.

Peak training memory (`harness.peak_bytes`): torch's profiler with `profile_memory=True` records every allocation
and free of torch's CPU allocator with its size. Their running sum over one training step is the exact number
of bytes torch holds above what was resident before the step (model, adapter, batch), and its maximum
is the step's peak: activations kept for backward, gradients, temporaries. This is deterministic and
counts only tensors, which is what we want to compare. The alternatives are worse for this:
`tracemalloc` only sees Python's allocator, not torch's C++ one; process RSS (psutil, ru_maxrss)
includes the Python heap, allocator caching and fragmentation, and is noisy at the scale of the
differences we compare. As an explanation of the peak we also total the activations saved for
backward (`torch.autograd.graph.saved_tensors_hooks`, deduplicated by storage, excluding model
parameters and adapter leaves, which exist whether or not a step runs).
"""

from __future__ import annotations

import copy
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402  (puts this checkout's lora_func first on the path, not an installed one)
import torch  # noqa: E402
from steps import (  # noqa: E402
    ALPHA,
    RANK,
    check_same_loss,
    ideal_step,
    lora_func_step,
    no_grad,
    peft_model,
    peft_step,
    projection_names,
)
from torch import nn  # noqa: E402

import lora_func as lf  # noqa: E402

BATCH, SEQ = 4, 128

# docs/performance.md targets (CPU): contender / reference <= limit.
TARGETS = {
    "train: lora_func / ideal": 1.10,
    "train: lora_func / peft": 1.0,
    "train: lora_func DoRA / lora_func LoRA": 1.10,
    "memory: lora_func / peft": 1.0,
    "inference: unmerged / base": 1.03,
    "inference: merged / base": 1.01,
}


def bench_model(seed: int = 0, max_positions: int = SEQ) -> nn.Module:
    """The docs/performance.md bench model: Qwen3-shaped, ~22M parameters, random init."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def bench_batch(vocab: int = 4096, seed: int = 1, seq: int = SEQ) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (BATCH, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


# -- contenders (their steps: benchmarks/steps.py) -----------------------------------------------------------


def train_steps(base: nn.Module, frozen: nn.Module, batch: dict, lora: lf.Params, dora: lf.Params):
    """({contender: training step}, {"peft": model, "peft DoRA": model}): the ideal on `frozen`, lora_func's LoRA
    and DoRA on `base` as loaded, and PEFT's LoRA and DoRA, each on its own copy of `base`."""
    pefts = {"peft": peft_model(base).train(), "peft DoRA": peft_model(base, use_dora=True).train()}
    steps = {
        "ideal": ideal_step(frozen, batch),
        "lora_func": lora_func_step(base, lora, batch),
        "peft": peft_step(pefts["peft"], batch),
        "lora_func DoRA": lora_func_step(base, dora, batch),
        "peft DoRA": peft_step(pefts["peft DoRA"], batch),
    }
    return steps, pefts


def inference_steps(base: nn.Module, params: lf.Params, peft: nn.Module, inputs: dict) -> dict[str, Callable]:
    """Forwards without grad (the models in eval mode): the base; lora_func unmerged; merged, as deployed (a copy
    of the model holding `lf.merge`'s weights, computed here once) and through `functional_call`; PEFT unmerged."""
    merged = {k: v.detach() for k, v in lf.merge(base, params).items()}
    merged_model = copy.deepcopy(base)
    loaded = merged_model.load_state_dict(merged, strict=False)  # strict=False: merge returns the adapted weights only
    assert not loaded.unexpected_keys, loaded.unexpected_keys
    return {
        "base": no_grad(lambda: base(**inputs).logits),
        "lora_func unmerged": no_grad(lambda: lf.apply(base, params, inputs).logits),
        "merged": no_grad(lambda: merged_model(**inputs).logits),
        "merged, functional_call": no_grad(lambda: torch.func.functional_call(base, merged, (), inputs).logits),
        "peft unmerged": no_grad(lambda: peft(**inputs).logits),
    }


# -- measurement (timing and peak memory: benchmarks/harness.py) ---------------------------------------------------


def saved_activation_bytes(fn: Callable[[], object], resident: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during `fn()`, minus `resident` ones."""
    skip = {t.untyped_storage().data_ptr() for t in resident}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


median = harness.median


# -- the benchmark --------------------------------------------------------------------------------


def run(repeats: int, warmup: int) -> dict:
    base = bench_model()
    base.train()
    batch = bench_batch(base.config.vocab_size)
    frozen = copy.deepcopy(base).requires_grad_(False)  # for ideal

    lora_cfg = lf.LoRAConfig(r=RANK, alpha=ALPHA, target_names=projection_names())
    params = lf.init(base, lora_cfg, seed=0)
    assert len(params.targets) == 7 * base.config.num_hidden_layers, len(params.targets)
    dora_params = lf.init(base, lf.DoRAConfig(r=RANK, alpha=ALPHA, target_names=lora_cfg.target_names), seed=0)
    train, pefts = train_steps(base, frozen, batch, params, dora_params)
    peft = pefts["peft"]
    resident = {
        "ideal": list(frozen.parameters()),
        "lora_func": list(base.parameters()) + [t for _, _, t in params.leaves()],
        "peft": list(peft.parameters()),
        "lora_func DoRA": list(base.parameters()) + [t for _, _, t in dora_params.leaves()],
        "peft DoRA": list(pefts["peft DoRA"].parameters()),
    }

    check_same_loss(train, 1e-4, "bench_core")  # fair: every adapter is the identity at init

    print(f"training steps ({repeats} repeats, {warmup} warmup) ...", file=sys.stderr)
    train_times = harness.alternate(train, repeats, warmup, "train")
    memory = {name: harness.peak_bytes(fn) for name, fn in train.items()}
    saved = {name: saved_activation_bytes(fn, resident[name]) for name, fn in train.items()}

    base.eval()
    peft.eval()
    infer = inference_steps(base, params, peft, {"input_ids": batch["input_ids"]})
    outputs = {name: fn() for name, fn in infer.items()}
    for name, out in outputs.items():
        torch.testing.assert_close(out, outputs["base"], rtol=1e-4, atol=1e-4, msg=f"bench: {name} output differs")
    print(f"inference ({repeats * 2} repeats) ...", file=sys.stderr)
    infer_times = harness.alternate(infer, repeats * 2, warmup, "inference")

    clocks = ("wall", "cpu")
    t = {c: {name: median(xs[c]) for name, xs in train_times.items()} for c in clocks}
    i = {c: {name: median(xs[c]) for name, xs in infer_times.items()} for c in clocks}
    ratios = {c: {**train_ratios(t[c]), **inference_ratios(i[c])} for c in clocks}
    ratios["memory"] = memory_ratios(memory)
    headline = {**ratios["wall"], **ratios["memory"]}
    return {
        "setup": {
            "model": "Qwen3ForCausalLM hidden 512, 6 layers, intermediate 1408, vocab 4096, heads 8/4 x 64",
            "base_params": sum(p.numel() for p in base.parameters()),
            "adapter_params": params.num_params(),
            "batch": BATCH,
            "seq": SEQ,
            "rank": RANK,
            "alpha": ALPHA,
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "warmup": warmup,
            "lora_func": str(Path(lf.__file__).parent),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
        "train_s": {
            name: {"median_wall": t["wall"][name], "median_cpu": t["cpu"][name], **xs}
            for name, xs in train_times.items()
        },
        "peak_memory_bytes": memory,
        "saved_activation_bytes": saved,
        "inference_s": {
            name: {"median_wall": i["wall"][name], "median_cpu": i["cpu"][name], **xs}
            for name, xs in infer_times.items()
        },
        "ratios": headline,
        "ratios_cpu_time": ratios["cpu"],
        "targets": {
            k: {
                "limit": v,
                "ratio": headline[k],
                "met": headline[k] < v if k.startswith("memory") else headline[k] <= v,
            }
            for k, v in TARGETS.items()
            if k in headline
        },
    }


def train_ratios(t: dict[str, float]) -> dict[str, float]:
    """The docs/performance.md training ratios from median step times `t` (of `train_steps`)."""
    return {
        "train: lora_func / ideal": t["lora_func"] / t["ideal"],
        "train: lora_func / peft": t["lora_func"] / t["peft"],
        "train: peft / ideal": t["peft"] / t["ideal"],
        "train: lora_func DoRA / lora_func LoRA": t["lora_func DoRA"] / t["lora_func"],
        "train: peft DoRA / peft LoRA": t["peft DoRA"] / t["peft"],
        "train: lora_func DoRA / peft DoRA": t["lora_func DoRA"] / t["peft DoRA"],
    }


def inference_ratios(i: dict[str, float]) -> dict[str, float]:
    """The docs/performance.md inference ratios from median forward times `i` (of `inference_steps`)."""
    return {
        "inference: unmerged / base": i["lora_func unmerged"] / i["base"],
        "inference: merged / base": i["merged"] / i["base"],
        "inference: merged via functional_call / base": i["merged, functional_call"] / i["base"],
        "inference: peft unmerged / base": i["peft unmerged"] / i["base"],
    }


def memory_ratios(m: dict[str, int]) -> dict[str, float]:
    """Peak-memory ratios from the peak bytes `m` of `train_steps`."""
    return {
        "memory: lora_func / peft": m["lora_func"] / m["peft"],
        "memory: lora_func / ideal": m["lora_func"] / m["ideal"],
        "memory: lora_func DoRA / peft DoRA": m["lora_func DoRA"] / m["peft DoRA"],
    }


def markdown(result: dict) -> str:
    t, i = result["train_s"], result["inference_s"]
    mem, saved = result["peak_memory_bytes"], result["saved_activation_bytes"]
    ideal, ideal_cpu = t["ideal"]["median_wall"], t["ideal"]["median_cpu"]
    lines = [
        "| training step | wall s | × ideal | CPU s | × ideal (CPU) | peak MiB | saved activations MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in t.items():
        w, c = row["median_wall"], row["median_cpu"]
        lines.append(
            f"| {name} | {w:.4f} | {w / ideal:.3f} | {c:.4f} | {c / ideal_cpu:.3f} "
            f"| {mem[name] / 2**20:.2f} | {saved[name] / 2**20:.2f} |"
        )
    lines.append(f"\npeak lora_func − peft: {mem['lora_func'] - mem['peft']:+,} bytes")
    base, base_cpu = i["base"]["median_wall"], i["base"]["median_cpu"]
    lines += ["", "| inference forward | wall s | × base | CPU s | × base (CPU) |", "|---|---:|---:|---:|---:|"]
    for name, row in i.items():
        w, c = row["median_wall"], row["median_cpu"]
        lines.append(f"| {name} | {w:.4f} | {w / base:.3f} | {c:.4f} | {c / base_cpu:.3f} |")
    lines += ["", "| ratio (wall) | value | CPU-time value | target | met |", "|---|---:|---:|---:|:---:|"]
    for name, value in result["ratios"].items():
        target = result["targets"].get(name)
        mark = ("yes" if target["met"] else "**no**") if target else ""
        limit = f"{'<' if name.startswith('memory') else '≤'} {target['limit']:.2f}" if target else ""
        cpu = result["ratios_cpu_time"].get(name)
        cpu_text = f"{cpu:.3f}" if cpu is not None else ""
        lines.append(f"| {name} | {value:.3f} | {cpu_text} | {limit} | {mark} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = harness.parse(harness.arguments(__doc__, "results/bench_core.json", warmup=True), argv)
    repeats = args.repeats or (3 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)

    result = run(repeats, warmup)
    print(markdown(result))
    harness.write_json(result, args.out)


if __name__ == "__main__":
    main()
