"""Every method with a PEFT mapping: lora_func's training step against PEFT's, on the bench model.

    python benchmarks/bench_methods.py [--quick] [--threads 1] [--methods lora c3a] [--out results/methods.json]

The methods are those of the registry (`lora_func.variants.REGISTRY`) that declare `PeftExchange`: a method
registered later gets its row with no change here. Each is configured as the MiniLM demo does (its `Recipe.options`
over r = 8, alpha = 16), on all seven projections of every layer of the bench model (`bench_core.py`), or, for a
method that adapts no linear layer (LN Tuning: norms, Trainable Tokens: embeddings), on the targets its config
picks by default. A calibrated method (`Variant.calibrated`) gets one small batch of calibration data; a method with
a schedule (AdaLoRA) has its leaves given to `lf.schedule_state` (the schedule itself runs after an optimizer step,
outside the step timed here).

Both hold the same leaves: lora_func's adapter (`lf.init`, its trainable leaves then moved off their init, so that
every leaf acts on the loss) is written by `lf.to_peft` and loaded by `PeftModel.from_pretrained` on another copy
of the model; the script checks that both compute the same loss, then times the two training steps alternately
(the shared harness and steps, `benchmarks/harness.py`, `benchmarks/steps.py`): forward, loss, backward, the
trainable gradients dropped, no optimizer. lora_func runs on the base as loaded (`requires_grad=True`), PEFT on
its copy, which it freezes.

Reported per method: the median step of each, wall and process-CPU time, and step / PEFT's step by both clocks
(DESIGN's limit: <= 1.0). On a machine shared with other jobs, `--threads 1` and the CPU-time ratio are the better
guide.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402  (puts this checkout's lora_func first on the path, not an installed one)
import torch  # noqa: E402
from bench_core import bench_batch, bench_model  # noqa: E402
from steps import ALPHA, RANK, check_same_loss, lora_func_step, peft_step, projection_names  # noqa: E402
from torch import nn  # noqa: E402

import lora_func as lf  # noqa: E402
from lora_func._variant import PeftExchange, Recipe, Variant  # noqa: E402
from lora_func.variants import REGISTRY  # noqa: E402

LIMIT = 1.0  # DESIGN's performance table: each method's train step <= 1.0 x PEFT's
# Config fields beyond a method's `Recipe.options` that the bench model needs: PEFT's C3A takes one block size for
# all targets, and the largest that divides every width here (512, 1408) is 128.
OPTIONS: dict[str, dict] = {"c3a": {"block_size": 128}}
NOISE = 0.02  # how far each trainable leaf moves off its init (N(0, NOISE²)), so every leaf acts on the loss


def methods() -> dict[str, Variant]:
    """The registered variants that PEFT also implements (`PeftExchange`), in registry order."""
    return {name: v for name, v in REGISTRY.items() if v.capability(PeftExchange) is not None}


def config_for(variant: Variant) -> lf.AdapterConfig:
    """The variant's config on the bench model: its `Recipe.options` and `OPTIONS` over r and alpha, on the seven
    projections where it adapts linear layers, else on the targets its config picks by default."""
    recipe = variant.capability(Recipe)
    fields = {"r": RANK, "alpha": ALPHA}
    if "linear" in variant.kinds:
        fields["target_names"] = projection_names()
    return variant.config(**{**fields, **dict(recipe.options if recipe else ()), **OPTIONS.get(variant.name, {})})


def moved(params: lf.Params, seed: int = 3) -> lf.Params:
    """`params` with every trainable leaf moved off its init by N(0, NOISE²) noise."""
    gen = torch.Generator().manual_seed(seed)
    trainable, frozen = lf.split(params)
    entries = {
        path: {k: (v.detach() + NOISE * torch.randn(v.shape, generator=gen)).requires_grad_() for k, v in e.items()}
        for path, e in trainable.items()
    }
    return lf.combine(trainable.replace(entries), frozen)


def peft_twin(base: nn.Module, params: lf.Params) -> nn.Module:
    """PEFT's model of `params`: `lf.to_peft`, then `PeftModel.from_pretrained` (trainable) on a copy of `base`."""
    import copy

    from peft import PeftModel

    with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lf.to_peft(params, directory, model=base)
        return PeftModel.from_pretrained(copy.deepcopy(base), directory, is_trainable=True).train()


def method_row(name: str, variant: Variant, base: nn.Module, batch: dict, repeats: int, warmup: int) -> dict:
    """One method: both adapters built, their losses compared, their steps timed alternately."""
    cfg = config_for(variant)
    calibration = [{k: v[:2] for k, v in batch.items()}] if variant.calibrated else None  # labels: LoRA-GA's loss
    params = moved(lf.init(base, cfg, seed=0, calibration_data=calibration))
    lf.schedule_state(params)  # a method with a schedule (AdaLoRA) trains only once its schedule has seen the leaves
    peft = peft_twin(base, params)
    steps = {"lora_func": lora_func_step(base, params, batch), "peft": peft_step(peft, batch)}
    losses = check_same_loss(steps, 1e-4, f"bench_methods ({name})")
    samples = harness.alternate(steps, repeats, warmup, name)
    t = {clock: harness.medians(samples, clock) for clock in ("wall", "cpu")}
    row = {
        "config": type(cfg).__name__,
        "targets": len(params.targets),
        "adapter_params": params.num_params(),
        "peft_params": sum(p.numel() for p in peft.parameters() if p.requires_grad),
        "loss": losses,
        "step_s": {n: {"median_wall": t["wall"][n], "median_cpu": t["cpu"][n], **s} for n, s in samples.items()},
        "ratio": harness.ratio(t["wall"], "lora_func", "peft"),
        "ratio_cpu": harness.ratio(t["cpu"], "lora_func", "peft"),
    }
    print(f"{name:>18}: step / PEFT {row['ratio']:.3f} wall, {row['ratio_cpu']:.3f} CPU", file=sys.stderr)
    return row


def run(names: list[str], repeats: int, warmup: int, seq: int) -> dict:
    """Every method of `names` in turn; one that fails (its export, PEFT's loading, a loss that differs) is recorded
    with its error and the others still run."""
    base = bench_model(max_positions=seq).train()
    batch = bench_batch(base.config.vocab_size, seq=seq)
    known = methods()
    rows = {}
    for name in names:
        try:
            rows[name] = method_row(name, known[name], base, batch, repeats, warmup)
        except Exception as e:
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name:>18}: failed, {rows[name]['error']}", file=sys.stderr)
    return {
        "setup": {
            "model": "Qwen3ForCausalLM hidden 512, 6 layers, intermediate 1408, vocab 4096, heads 8/4 x 64",
            "batch": batch["input_ids"].shape[0],
            "seq": seq,
            "rank": RANK,
            "alpha": ALPHA,
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "warmup": warmup,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg()[0],  # at the end: the other jobs that wall time also measured
        },
        "limit": LIMIT,
        "methods": rows,
    }


def markdown(result: dict) -> str:
    """The table: per method, both median steps and step / PEFT's step, by wall and by CPU time."""
    lines = [
        "| method | targets | lora_func s | PEFT s | × PEFT | lora_func CPU s | PEFT CPU s | × PEFT (CPU) "
        "| ≤ 1.0: wall; CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for name, row in result["methods"].items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'].splitlines()[0]} | | | | | | | **no**; **no** |")
            continue
        mine, peft = row["step_s"]["lora_func"], row["step_s"]["peft"]
        met = "; ".join("yes" if row[k] <= result["limit"] else "**no**" for k in ("ratio", "ratio_cpu"))
        lines.append(
            f"| {name} | {row['targets']} | {mine['median_wall']:.4f} | {peft['median_wall']:.4f} | {row['ratio']:.3f} "
            f"| {mine['median_cpu']:.4f} | {peft['median_cpu']:.4f} | {row['ratio_cpu']:.3f} | {met} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = harness.arguments(__doc__, "results/methods.json", threads=1, warmup=True)
    parser.add_argument("--methods", nargs="+", choices=tuple(methods()), default=tuple(methods()))
    parser.add_argument("--seq", type=int, default=None, help="sequence length (128; 64 with --quick)")
    args = harness.parse(parser, argv)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")  # PEFT's SHiRA, on every forward
    repeats = args.repeats or (2 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    seq = args.seq or (64 if args.quick else 128)

    result = run(list(args.methods), repeats, warmup, seq)
    print(markdown(result))
    harness.write_json(result, args.out)
    if any("error" in row for row in result["methods"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
