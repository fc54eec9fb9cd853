"""How a LoRA training step's cost grows with rank and sequence length: lora_func vs PEFT vs ideal.

    python benchmarks/bench_scaling.py [--quick] [--out results/scaling.json]

The bench model and step functions of `bench_core.py` (Qwen3-shaped, ~22M parameters, batch 4, LoRA on
all seven projections, alpha = 2r, 2 threads). Two sweeps, each point timed alternately in one process
(the shared harness, `benchmarks/harness.py`), medians after warmup; peak memory as in `bench_core.py` (torch's
profiler, allocations above what was resident before the step):
- rank r in 4, 8, 16, 32, 64 at sequence 128;
- sequence length 64, 128, 256, 512, 1024 at r = 8.
The ideal (base forward + input-gradient backward, no adapter) does not depend on r, but it is timed at
every point all the same, so each point's ratios come from one alternating run.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import torch  # noqa: E402
from bench_core import bench_batch, bench_model  # noqa: E402
from steps import ideal_step, lora_func_step, peft_model, peft_step, projection_names  # noqa: E402

import lora_func as lf  # noqa: E402  (bench_core put this checkout first on the path)

RANKS = (4, 8, 16, 32, 64)
SEQS = (64, 128, 256, 512, 1024)


def point(base: torch.nn.Module, frozen: torch.nn.Module, r: int, seq: int, repeats: int, warmup: int) -> dict:
    """Median step seconds and peak bytes of ideal, lora_func and PEFT at rank r and sequence length seq."""
    batch = bench_batch(base.config.vocab_size, seq=seq)
    cfg = lf.LoRAConfig(r=r, alpha=2 * r, target_names=projection_names())
    params = lf.init(base, cfg, seed=0)
    peft = peft_model(base, r=r, alpha=2 * r).train()
    steps = {
        "ideal": ideal_step(frozen, batch),
        "lora_func": lora_func_step(base, params, batch),
        "peft": peft_step(peft, batch),
    }
    times = harness.alternate(steps, repeats, warmup, f"r={r} seq={seq}")
    row = {"r": r, "seq": seq}
    for name, fn in steps.items():
        row[f"{name}_s"] = torch.tensor(times[name]["wall"]).median().item()
        row[f"{name}_peak_bytes"] = harness.peak_bytes(fn)
    del peft
    return row


def run(repeats: int, warmup: int, ranks=RANKS, seqs=SEQS) -> dict:
    base = bench_model(max_positions=max(seqs)).train()
    frozen = copy.deepcopy(base).requires_grad_(False)
    rank_rows = [point(base, frozen, r, 128, repeats, warmup) for r in ranks]
    # Long sequences take seconds per step: fewer repeats there keep the sweep short.
    seq_rows = [point(base, frozen, 8, s, repeats if s <= 256 else max(3, repeats // 2), warmup) for s in seqs]
    for row in rank_rows + seq_rows:
        print(
            f"r={row['r']:>3} seq={row['seq']:>5}: lora_func {row['lora_func_s'] / row['ideal_s']:.3f}x ideal, "
            f"peft {row['peft_s'] / row['ideal_s']:.3f}x ideal, memory lora_func/peft "
            f"{row['lora_func_peak_bytes'] / row['peft_peak_bytes']:.3f}",
            file=sys.stderr,
        )
    return {
        "setup": {"batch": 4, "threads": torch.get_num_threads(), "repeats": repeats, "warmup": warmup},
        "rank": rank_rows,
        "seq": seq_rows,
    }


def main(argv: list[str] | None = None) -> None:
    args = harness.parse(harness.arguments(__doc__, "results/scaling.json"), argv)  # --quick: two points per sweep
    repeats = args.repeats or (2 if args.quick else 7)
    sweeps = {"ranks": RANKS[:2], "seqs": SEQS[:2]} if args.quick else {}
    result = run(repeats, 1, **sweeps)
    harness.write_json(result, args.out)


if __name__ == "__main__":
    main()
