"""Launch-bound training step: a deep, thin model where each step is bound by per-op overhead, not FLOPs.

    python benchmarks/bench_launch.py [--quick] [--out results/launch.json] [--profile]

A CPU proxy for training a small or medium model on a GPU, where a step is bound by kernel launches and
Python (docs/performance.md, "Performance"): a randomly initialised Qwen3ForCausalLM of 24 layers, hidden 128,
intermediate 384, 4 query / 2 key-value heads of 32, vocab 1024; one row of 16 tokens with the LM loss;
LoRA r=8, alpha=16 on all seven projections of every layer (168 targets); one thread. A step is forward,
loss, backward, AdamW step and zeroing the gradients. Contenders (one process, alternated by the shared
harness, medians):
- ideal: the frozen base on `inputs_embeds` that require grad: forward plus the input-gradient backward,
  no weight gradient, no optimizer: what a zero-cost adapter would take.
- lora_func, base as loaded: `lf.apply` on the base with `requires_grad=True` everywhere, as
  `from_pretrained` leaves it (lora_func keeps base gradients out all the same).
- lora_func, base frozen: the same on a copy frozen by hand (`requires_grad_(False)`).
- peft: `get_peft_model` with the same LoRA config, which freezes its base copy.
Every contender computes the same loss at init (B = 0), checked before timing.

`--profile` adds, for each lora_func contender, a cProfile of `--profile-steps` steps (the Python functions
with the most own time) and torch.profiler's operator counts per step against PEFT's.
"""

from __future__ import annotations

import copy
import cProfile
import io
import os
import platform
import pstats
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402  (puts this checkout's lora_func first on the path)
import torch  # noqa: E402
from steps import ALPHA, RANK, check_same_loss, ideal_step, lora_func_step, peft_model, peft_step, projection_names  # noqa: E402
from torch import nn  # noqa: E402

import lora_func as lf  # noqa: E402

LAYERS, HIDDEN, SEQ = 24, 128, 16

# docs/performance.md targets: contender / reference <= limit.
TARGETS = {
    "launch: lora_func / peft": 0.85,
    "launch: lora_func frozen / peft": 0.85,
    "launch: lora_func / ideal": 1.6,
    "launch: lora_func frozen / ideal": 1.6,
}


def launch_model(seed: int = 0) -> nn.Module:
    """The deep thin Qwen3, in train mode, every parameter requiring grad (as HF loads a model)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=1024,
        hidden_size=HIDDEN,
        intermediate_size=384,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).train()


def launch_batch(vocab: int, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (1, SEQ), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def contenders(device: torch.device | str = "cpu") -> dict[str, Callable[[], torch.Tensor]]:
    """The four steps on `device`, each checked to compute the ideal's loss at init."""
    base = launch_model().to(device)
    batch = {k: v.to(device) for k, v in launch_batch(base.config.vocab_size).items()}
    frozen = copy.deepcopy(base).requires_grad_(False)
    cfg = lf.LoRAConfig(r=RANK, alpha=ALPHA, target_names=projection_names())
    params = lf.init(base, cfg, seed=0)
    assert len(params.targets) == 7 * LAYERS, len(params.targets)
    assert all(p.requires_grad for p in base.parameters())
    steps = {
        "ideal": ideal_step(frozen, batch),
        "lora_func": lora_func_step(base, params, batch, optimizer=True),
        "lora_func frozen": lora_func_step(frozen, lf.init(frozen, cfg, seed=0), batch, optimizer=True),
        "peft": peft_step(peft_model(base).train(), batch, optimizer=True),
    }
    check_same_loss(steps, 1e-4, "bench_launch")  # B = 0 at init: one step leaves B ≠ 0 after
    return steps


def python_profile(fn: Callable[[], object], steps: int, top: int) -> str:
    """cProfile of `steps` calls of `fn`: the functions with the most own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        fn()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def operator_counts(fn: Callable[[], object]) -> dict[str, int]:
    """{operator: calls} in one call of `fn` (torch.profiler, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


def run(repeats: int, warmup: int) -> dict:
    steps = contenders()
    print(f"launch-bound steps ({repeats} repeats, {warmup} warmup) ...", file=sys.stderr)
    samples = harness.alternate(steps, repeats, warmup, "launch")
    clocks = ("wall", "cpu")
    t = {c: harness.medians(samples, c) for c in clocks}
    ratios = {
        c: {
            "launch: lora_func / ideal": harness.ratio(t[c], "lora_func", "ideal"),
            "launch: lora_func / peft": harness.ratio(t[c], "lora_func", "peft"),
            "launch: lora_func frozen / ideal": harness.ratio(t[c], "lora_func frozen", "ideal"),
            "launch: lora_func frozen / peft": harness.ratio(t[c], "lora_func frozen", "peft"),
            "launch: peft / ideal": harness.ratio(t[c], "peft", "ideal"),
        }
        for c in clocks
    }
    return {
        "setup": {
            "model": f"Qwen3ForCausalLM hidden {HIDDEN}, {LAYERS} layers, intermediate 384, vocab 1024, heads 4/2 x 32",
            "batch": 1,
            "seq": SEQ,
            "rank": RANK,
            "targets": 7 * LAYERS,
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "warmup": warmup,
            "lora_func": str(Path(lf.__file__).parent),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "train_s": {
            name: {"median_wall": t["wall"][name], "median_cpu": t["cpu"][name], **xs} for name, xs in samples.items()
        },
        "ratios": ratios["wall"],
        "ratios_cpu_time": ratios["cpu"],
        "targets": {
            k: {"limit": v, "ratio": ratios["wall"][k], "met": ratios["wall"][k] <= v} for k, v in TARGETS.items()
        },
    }


def markdown(result: dict) -> str:
    t = result["train_s"]
    ideal, ideal_cpu = t["ideal"]["median_wall"], t["ideal"]["median_cpu"]
    peft, peft_cpu = t["peft"]["median_wall"], t["peft"]["median_cpu"]
    lines = [
        "| launch-bound step | wall ms | × ideal | × peft | CPU ms | × ideal (CPU) | × peft (CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in t.items():
        w, c = row["median_wall"], row["median_cpu"]
        lines.append(
            f"| {name} | {w * 1e3:.2f} | {w / ideal:.3f} | {w / peft:.3f} "
            f"| {c * 1e3:.2f} | {c / ideal_cpu:.3f} | {c / peft_cpu:.3f} |"
        )
    lines += ["", "| ratio (wall) | value | target | met |", "|---|---:|---:|:---:|"]
    for name, target in result["targets"].items():
        mark = "yes" if target["met"] else "**no**"
        lines.append(f"| {name} | {target['ratio']:.3f} | ≤ {target['limit']:.2f} | {mark} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = harness.arguments(__doc__, "results/launch.json", threads=1, warmup=True)
    parser.add_argument("--profile", action="store_true", help="also profile the lora_func steps (not timed)")
    parser.add_argument("--profile-steps", type=int, default=10)
    args = harness.parse(parser, argv)
    repeats = args.repeats or (5 if args.quick else 60)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)

    result = run(repeats, warmup)
    print(markdown(result))
    harness.write_json(result, args.out)
    if args.profile:
        steps = contenders()
        peft_ops = operator_counts(steps["peft"])
        for name in ("lora_func", "lora_func frozen"):
            print(f"\n## cProfile, {args.profile_steps} steps of {name}\n")
            print(python_profile(steps[name], args.profile_steps, 25))
            ops = operator_counts(steps[name])
            print(f"## torch operators per step, {name} (peft)\n")
            for op, n in sorted(ops.items(), key=lambda kv: -kv[1])[:25]:
                print(f"{n:6d} ({peft_ops.get(op, 0):6d})  {op}")


if __name__ == "__main__":
    main()
