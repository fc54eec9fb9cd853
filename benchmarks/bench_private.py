"""DP-SGD step cost: `lf.private_grads` against the non-private step, and against Opacus + PEFT.

    python benchmarks/bench_private.py [--quick] [--out results/private.json] [--threads 2]

Bench model and batch of bench_core.py (docs/performance.md "Performance": Qwen3-shaped, hidden 512, 6 layers,
intermediate 1408, vocab 4096; batch 4 × seq 128; LoRA r=8, alpha=16 on all seven projections; 2 threads).
Every step computes the gradient of the trainable leaves from the per-example LM losses (mean next-token
loss of each row) and stops there: no optimizer update for anyone. Contenders, timed alternately in one
process with bench_core's loop (rotating order, medians, wall and CPU time):
- non-private: `lf.apply`, the mean of the per-row losses, `torch.autograd.grad` over the trainable leaves.
- private_grads: `lf.private_grads(max_grad_norm=1, noise_multiplier=1)`; LoRA takes its book-keeping path
  (per-example norms from each target's input and output gradient in one backward; lora_func/_private.py).
- private_grads (per-example path): the same call forced through `per_example_grads` (one adapter copy per
  row, the per-example gradients materialized), the path every other variant takes.
- PEFT, non-private: the PEFT model's forward and backward.
- Opacus + PEFT: `PrivacyEngine.make_private` over the PEFT model (`grad_sample_mode="hooks"`, Opacus's
  default: per-sample gradients of lora_A / lora_B from its nn.Linear hooks), forward, backward, and the
  DP optimizer's clip-and-noise (`pre_step`), without the parameter update.
Ratios: private_grads / non-private (docs/performance.md target <= 1.3), private_grads / Opacus + PEFT (target < 1).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core  # noqa: E402
import harness  # noqa: E402
import steps  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lora_func as lf  # noqa: E402
from lora_func import _private  # noqa: E402

C, SIGMA = 1.0, 1.0
TARGETS = {"private_grads / non-private": 1.3, "private_grads / opacus+peft": 1.0}


def row_losses(ids: torch.Tensor):
    def loss(out):
        return F.cross_entropy(out.logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    return loss


def contenders(model, batch) -> dict:
    ids = batch["input_ids"]
    loss = row_losses(ids)
    cfg = lf.LoRAConfig(r=steps.RANK, alpha=steps.ALPHA, target_names=tuple(p + "$" for p in steps.PROJECTIONS))
    params = lf.init(model, cfg)
    leaves = lf.trainable_leaves(params)
    generator = torch.Generator().manual_seed(0)

    def non_private():
        return torch.autograd.grad(loss(lf.apply(model, params, batch)).mean(), leaves)

    def private():
        return lf.private_grads(
            model, params, batch, loss, max_grad_norm=C, noise_multiplier=SIGMA, generator=generator
        )

    def private_per_example():
        saved = _private._book_keeping_applies
        _private._book_keeping_applies = lambda params: False
        try:
            return private()
        finally:
            _private._book_keeping_applies = saved

    peft = steps.peft_model(model)
    peft_leaves = [p for p in peft.parameters() if p.requires_grad]

    def peft_step():
        return torch.autograd.grad(loss(peft(input_ids=ids)).mean(), peft_leaves)

    opacus_step = opacus_peft(model, ids, loss)
    return {
        "non-private": non_private,
        "private_grads": private,
        "private_grads (per-example path)": private_per_example,
        "peft": peft_step,
        "opacus+peft": opacus_step,
    }


def opacus_peft(model, ids, loss):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    peft = steps.peft_model(model)
    optimizer = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.0)
    loader = DataLoader(TensorDataset(ids), batch_size=len(ids))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure RNG off; Opacus's notes on the model
        engine = PrivacyEngine()
        dp_model, dp_optimizer, _ = engine.make_private(
            module=peft,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=SIGMA,
            max_grad_norm=C,
            grad_sample_mode="hooks",
            poisson_sampling=False,
        )

    def step():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # full backward hooks where no input requires grad: as intended
            loss(dp_model(input_ids=ids)).mean().backward()
        dp_optimizer.pre_step()  # clip, accumulate, noise, scale: p.grad is the DP gradient
        dp_optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    args = harness.parse(harness.arguments(__doc__, "results/private.json", repeats=9))
    repeats, warmup = (2, 1) if args.quick else (args.repeats, 2)

    model = bench_core.bench_model().train()
    batch = bench_core.bench_batch()
    samples = harness.alternate(contenders(model, batch), repeats, warmup, "private")
    medians = {name: {clock: statistics.median(v) for clock, v in s.items()} for name, s in samples.items()}
    ratios = {}
    for clock in ("wall", "cpu"):
        m = {name: medians[name][clock] for name in medians}
        ratios[clock] = {
            "private_grads / non-private": m["private_grads"] / m["non-private"],
            "per-example path / non-private": m["private_grads (per-example path)"] / m["non-private"],
            "private_grads / opacus+peft": m["private_grads"] / m["opacus+peft"],
            "opacus+peft / peft": m["opacus+peft"] / m["peft"],
        }
    for name, m in medians.items():
        print(f"{name:36s} wall {m['wall'] * 1e3:8.1f} ms   cpu {m['cpu'] * 1e3:8.1f} ms")
    for name in ratios["wall"]:
        target = f"  (target <= {TARGETS[name]})" if name in TARGETS else ""
        print(f"{name:36s} wall {ratios['wall'][name]:.3f}   cpu {ratios['cpu'][name]:.3f}{target}")
    result = {
        "machine": {"platform": platform.platform(), "threads": args.threads, "torch": torch.__version__},
        "quick": args.quick,
        "repeats": repeats,
        "samples": samples,
        "medians": medians,
        "ratios": ratios,
        "targets": TARGETS,
    }
    harness.write_json(result, args.out)


if __name__ == "__main__":
    main()
