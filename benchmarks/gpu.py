"""GPU checks and benchmarks of lora_func, run by `nox -s gpu` on a CUDA machine (written for one H200).

    python benchmarks/gpu.py [--out results/gpu.json] [--budget-s 400] [--parts contract bnb fsdp perf]
    python benchmarks/gpu.py --device cpu --smoke     # tiny shapes, few steps: proves the script end to end

Needs torch, transformers, peft (and lora_func's own dependencies); bitsandbytes is optional: if it does not
import, the bnb part is reported as SKIPPED, loudly. Nothing is downloaded: every model is built from a config.
On a GPU machine without network that has only torch, transformers and peft, bring the rest as wheels, made
where there is network for that machine's Python (e.g. 3.12):
    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        -d .whl bitsandbytes optree
and there: `pip install --no-deps .whl/*.whl && python benchmarks/gpu.py` (from the repository root, which
puts this checkout's lora_func first on the path).

Parts, in the order they run. Each has a time budget (a SIGALRM stops it when it runs over; timing loops also
stop early on their own), a part that fails or runs out of time is recorded with its error and the next one
runs, and the JSON is rewritten after every part, so a run cut short keeps what it measured. A watchdog ends the
process (JSON written) if everything together overruns by a margin. The whole run stays under 8 minutes.

contract   the library's invariants on the device, for every registered variant (`lora_func.variants.REGISTRY`),
           on a tiny fp32 Qwen3: identity at init, model untouched (state bitwise, flags, hooks, attributes, no
           base gradient although the base requires grad), gradients on trainable leaves only and
           torch.func.grad = autograd, save -> load bitwise, functional_call(merge) ≈ apply.
bnb        bitsandbytes bases on the device, nf4 `Linear4bit` and `Linear8bitLt`, for LoRA and DoRA: identity at
           init, forward and backward, torch.func.grad = autograd, all against a float twin that holds the
           dequantized weights; then identity and finite gradients for every variant.
fsdp       FSDP2 (`fully_shard` on every decoder layer and the root): the adapter gradients of `lf.apply` on the
           sharded base equal those on the unsharded one (each rank its share of the batch, then
           `lf.all_reduce_grads`), with the base frozen and with the base requiring grad; and torch.func.grad.
           All visible GPUs as ranks when there are several (spawned processes), else one in-process rank.
perf:*     A Qwen3-0.6B-shaped model from `Qwen3Config` (hidden 1024, 28 layers, intermediate 3072, 16 query /
           8 key-value heads of 128, vocab 151936, tied embeddings) in bf16, batch 4 x seq 512, LoRA r=8 alpha=16
           on all seven projections (fp32 leaves, as PEFT's). Contenders alternate in one process (the shared
           harness, benchmarks/harness.py); each call is timed with CUDA events around a synchronized call; medians.
           - train: training step (forward, LM loss, backward) of lora_func, PEFT, and the ideal (the frozen base
             on inputs_embeds that require grad: base forward + input-gradient backward); lora_func DoRA and PEFT
             DoRA; peak memory of each (torch.cuda.max_memory_allocated above what was allocated before the step).
             lora_func runs on the base with requires_grad=True (a freshly loaded HF model), PEFT on its copy.
           - inference: base forward vs lora_func unmerged, merged (functional_call with `lf.merge`) and PEFT.
           - k_adapters: K=8 adapters forward+backward: vmap(grad) over `lf.stack` (default SDPA and SDPA's math
             backend), one `adapter_ids` call on the batch repeated K times, a Python loop, PEFT's set_adapter
             loop, against K x ideal.
           - mixed: 8 rows with 8 different adapters, inference: `adapter_ids` vs PEFT's `adapter_names` vs the
             base forward on the same rows.
           - compile: a lora_func training step, eager vs `torch.compile(fullgraph=True)` (inductor), and a
             second adapter through the same compiled function (no stale weights). If one graph cannot be had,
             that is a failure, recorded with dynamo's reason, and the step is timed with graph breaks allowed.
           k_adapters, mixed and compile run on a copy of the base with requires_grad=False.
           The step functions and PEFT builders come from bench_core.py and bench_functional.py (CPU-oriented
           scripts with their own timing); the docs/performance.md targets are bench_core's.

Exit status: 0 when every part ran (or was skipped, e.g. bnb absent) and every check passed, 1 otherwise.
Performance targets that are not met are reported, not failed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_core, bench_functional
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's lora_func
sys.path.insert(2, str(Path(__file__).resolve().parents[1] / "tests"))  # components.py (no pytest needed)

import harness  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

try:
    import components
    from components import changes, perturbed, quantize, snapshot

    import lora_func as lf
    from lora_func.kinds.linear import dense_weight
    from lora_func.variants import REGISTRY
except Exception as _import_error:  # e.g. a dependency of lora_func (optree, safetensors) missing on the machine
    lf = None
    LORA_FUNC_IMPORT_ERROR = f"{type(_import_error).__name__}: {_import_error}"
else:
    LORA_FUNC_IMPORT_ERROR = None

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA, K = 8, 16, 8
TOTAL_BUDGET_S = 400  # the parts; imports, CUDA start-up and the summary stay well inside 8 minutes
WATCHDOG_GRACE_S = 30  # past the budget: write what we have and exit


# ---- settings -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    device: torch.device
    smoke: bool
    dtype: torch.dtype  # of the perf model
    batch: int
    seq: int
    repeats: dict[str, int]
    warmup: int
    caps: dict[str, float]  # seconds per part, at most (the total budget also applies)
    fsdp_world: int | None


def settings(args: argparse.Namespace) -> Settings:
    device = torch.device(args.device)
    caps = {
        "contract": 70,
        "bnb": 60,
        "fsdp": 50,
        "perf: build": 45,
        "perf: train": 70,
        "perf: inference": 35,
        "perf: k_adapters": 70,
        "perf: mixed": 35,
        "perf: compile": 200,
    }
    if args.smoke:
        repeats = {"train": 3, "inference": 3, "k_adapters": 2, "mixed": 3, "compile": 3}
        caps = {name: cap * 2 if device.type == "cpu" else cap for name, cap in caps.items()}  # a slow shared CPU
        return Settings(device, True, torch.bfloat16, 2, 32, repeats, 1, caps, args.fsdp_world)
    repeats = {"train": 15, "inference": 25, "k_adapters": 5, "mixed": 20, "compile": 10}
    return Settings(device, False, torch.bfloat16, 4, 512, repeats, 2, caps, args.fsdp_world)


# ---- models and batches ---------------------------------------------------------------------------------------


def qwen3_06b_config(smoke: bool):
    """Qwen3-0.6B's shapes (its config.json on the Hub), or a tiny model of the same architecture for --smoke."""
    from transformers import Qwen3Config

    if smoke:
        shapes = dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
    else:
        shapes = dict(
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
        )
    return Qwen3Config(
        **shapes,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        use_cache=False,  # no KV cache in any forward here: the same work for every contender
    )


def build_qwen3(config, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    return model.to(dtype).train()


def tiny_qwen3(device: torch.device, seed: int = 0, **overrides) -> nn.Module:
    """The test suite's tiny Qwen3 (tests/components.py), fp32, on `device`."""
    return components.tiny_qwen3(seed, **overrides).to(device)


def lm_batch(rows: int, seq: int, vocab: int, device: torch.device, seed: int = 1) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in components.qwen3_batch(rows, seq, vocab, seed).items()}


def copied(params):
    """The same leaf values in new tensors, with the same trainable flags."""
    return params.replace(
        {p: {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in e.items()} for p, e in params.items()}
    )


def init_variant(name: str, model: nn.Module, batch: dict, seed: int = 0):
    kwargs = {"calibration_data": [batch], "progress": False} if REGISTRY[name].calibrated else {}
    return lf.init(model, REGISTRY[name].config(r=4), seed=seed, **kwargs)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (0 when both are 0)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def leaf_grads(params) -> dict[str, torch.Tensor | None]:
    return {f"{p}.{k}": t.grad for p, k, t in lf.split(params)[0].leaves()}


def clear_grads(params) -> None:
    for _, _, t in params.leaves():
        t.grad = None


# ---- timing ---------------------------------------------------------------------------------------------------


def alternate(
    contenders: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    device: torch.device,
    stop_at: float,
    min_repeats: int = 2,
) -> harness.Samples:
    """The shared harness (benchmarks/harness.py): CUDA events around each synchronized call on a GPU. Stops
    after `min_repeats` rounds once `stop_at` (time.monotonic) has passed."""
    return harness.alternate(
        contenders, repeats, warmup, "gpu", device=device, stop_at=stop_at, min_repeats=min_repeats
    )


def summarize(samples: harness.Samples) -> dict[str, dict[str, Any]]:
    return {
        name: {"median_s": statistics.median(s), "min_s": min(s), "n": len(s), "samples_s": s}
        for name, s in harness.walls(samples).items()
        if s
    }


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during `fn()` above what was allocated when it started."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    import bench_core

    return bench_core.peak_bytes(fn)  # CPU: torch's profiler over the allocator's events


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- running parts under budgets ------------------------------------------------------------------------------


class PartTimeout(Exception):
    pass


def timed_out(error: BaseException | None) -> bool:
    """Whether `error` is, or wraps, a PartTimeout (torch._dynamo re-raises what it catches as its own errors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, PartTimeout):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


class Skipped(Exception):
    """A part that cannot run here, for a stated reason (reported loudly, not a failure)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise PartTimeout in the main thread once `seconds` have passed (SIGALRM; a no-op where there is none)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise PartTimeout(f"ran past its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    # Fires again every 2 s after the first: code that catches and wraps exceptions (dynamo does) cannot hold on.
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01), 2.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Run:
    cfg: Settings
    out: Path
    budget_s: float
    report: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def left(self) -> float:
        return self.started + self.budget_s - time.monotonic()

    def part(self, name: str, fn: Callable[[dict[str, Any], float], None], needs: tuple[str, ...] = ()) -> None:
        """Run `fn(result, deadline)`; `result` is filled as it goes, so a part cut short keeps what it found."""
        entry: dict[str, Any] = {"status": "running", "result": {}}
        with self.lock:
            self.report["parts"][name] = entry
        missing = [n for n in needs if self.report["parts"].get(n, {}).get("status") != "ok"]
        budget = min(self.cfg.caps[name], self.left())
        if missing:
            entry.update(status="skipped", reason=f"needs {', '.join(missing)}, which did not complete")
        elif budget < 5:
            entry.update(status="skipped", reason=f"out of time ({self.left():.0f} s of the budget left)")
        else:
            entry["budget_s"] = round(budget, 1)
            print(f"[gpu.py] {name} (budget {budget:.0f} s) ...", file=sys.stderr, flush=True)
            start = time.monotonic()
            try:
                with time_limit(budget):
                    fn(entry["result"], start + budget)
                entry["status"] = "ok"
            except Skipped as e:
                entry.update(status="skipped", reason=str(e))
                banner = f"!!! {name}: SKIPPED: {e} !!!"
                print(f"\n{'!' * len(banner)}\n{banner}\n{'!' * len(banner)}\n", file=sys.stderr, flush=True)
            except Exception as e:
                if timed_out(e):
                    entry.update(status="timeout", error=f"ran past its budget of {budget:.0f} s")
                else:
                    entry.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            entry["elapsed_s"] = round(time.monotonic() - start, 2)
            status = entry["status"] + (
                f": {entry.get('error', entry.get('reason', ''))}" if entry["status"] != "ok" else ""
            )
            print(f"[gpu.py] {name}: {status[:300]} ({entry['elapsed_s']:.1f} s)", file=sys.stderr, flush=True)
        free_memory(self.cfg.device)
        self.write()

    def write(self) -> None:
        with self.lock:
            self.report["elapsed_s"] = round(time.monotonic() - self.started, 2)
            text = json.dumps(self.report, indent=2, default=str)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(text)


# ---- contract -------------------------------------------------------------------------------------------------

CONTRACT_TOL = {"identity": 1e-5, "func_vs_autograd_rel": 1e-4, "merge": 1e-4}


def part_contract(cfg: Settings) -> Callable[[dict, float], None]:
    def run(result: dict, deadline: float) -> None:
        device = cfg.device
        batch = lm_batch(2, 12, 128, device)
        for name in sorted(REGISTRY):
            if time.monotonic() > deadline - 2:
                result[name] = {"ok": False, "error": "not run: out of time"}
                continue
            try:
                result[name] = contract_checks(name, device, batch)
            except Exception as e:
                if timed_out(e):
                    raise
                result[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}

    return run


def contract_checks(name: str, device: torch.device, batch: dict) -> dict[str, Any]:
    model = tiny_qwen3(device)
    assert any(p.requires_grad for p in model.parameters())  # as a freshly loaded HF model
    with torch.no_grad():
        base = model(**batch).logits
    before = snapshot(model)
    checks: dict[str, Any] = {}

    params = init_variant(name, model, batch)
    checks["untouched_after_init"] = changes(model, before)
    with torch.no_grad():
        checks["identity_max_abs"] = max_abs(lf.apply(model, params, batch).logits, base)

    params = perturbed(params)
    out = lf.apply(model, params, batch)
    with torch.no_grad():
        between = model(**batch).logits  # a base call while apply's output awaits backward
    checks["base_call_between_is_base"] = torch.equal(between, base)
    out.loss.backward()
    checks["untouched_after_backward"] = changes(model, before)
    trainable, frozen = lf.split(params)
    grads = leaf_grads(params)
    checks["trainable_without_grad"] = [k for k, g in grads.items() if g is None or not torch.isfinite(g).all()]
    checks["frozen_with_grad"] = [f"{p}.{k}" for p, k, t in frozen.leaves() if t.grad is not None or t.requires_grad]

    def loss(t):
        return lf.apply(model, lf.combine(t, frozen), batch).loss

    func = torch.func.grad(loss)(trainable)
    checks["func_vs_autograd_rel"] = max(rel_err(func[p][k], grads[f"{p}.{k}"]) for p, k, _ in trainable.leaves())
    checks["untouched_after_func_grad"] = changes(model, before)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter.safetensors")
        lf.save(params, path)
        loaded = lf.load(path, model)
    same = loaded.config == params.config and list(loaded) == list(params)
    same = same and all(
        torch.equal(loaded[p][k], t.detach()) and loaded[p][k].device == t.device for p, k, t in params.leaves()
    )
    with torch.no_grad():
        same = same and torch.equal(lf.apply(model, loaded, batch).logits, lf.apply(model, params, batch).logits)
    checks["save_load_bitwise"] = same

    merged = lf.merge(model, params)
    with torch.no_grad():
        got = torch.func.functional_call(model, {k: v.detach() for k, v in merged.items()}, (), dict(batch)).logits
        checks["merge_max_abs"] = max_abs(got, lf.apply(model, params, batch).logits)
    checks["untouched_at_end"] = changes(model, before)

    checks["ok"] = (
        not any(checks[k] for k in checks if k.startswith("untouched") or k.endswith("_grad"))
        and checks["identity_max_abs"] <= CONTRACT_TOL["identity"]
        and checks["base_call_between_is_base"]
        and checks["func_vs_autograd_rel"] <= CONTRACT_TOL["func_vs_autograd_rel"]
        and checks["save_load_bitwise"]
        and checks["merge_max_abs"] <= CONTRACT_TOL["merge"]
    )
    return checks


# ---- bitsandbytes ---------------------------------------------------------------------------------------------

# Relative errors (‖a − b‖/‖b‖) against the float twin that holds the dequantized weights. nf4 with an fp32
# compute dtype computes x·deq(W)ᵀ in fp32: tight. LLM.int8 also quantizes the activations row-wise to int8 (and
# runs in fp16) on CUDA, so its outputs and gradients are only close to the twin's.
BNB_TOL = {4: {"logits": 1e-3, "grads": 1e-2}, 8: {"logits": 5e-2, "grads": 1.5e-1}}
# torch.func.grad (bnb layers through lora_func's QuantizedLinear: backward grad @ deq(W) in fp32) vs autograd
# (bnb's own backward); on CUDA bnb's 8-bit backward may round through fp16.
BNB_FUNC_TOL = {4: 1e-4, 8: 1e-3}


def dequantized_twin(quantized: nn.Module, device: torch.device, **shape) -> nn.Module:
    twin = tiny_qwen3(torch.device("cpu"), **shape).to(device)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
                twin.get_submodule(name).weight.copy_(dense_weight(module))
    return twin


BNB_SHAPE = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_attention_heads=4, head_dim=32)


def part_bnb(cfg: Settings) -> Callable[[dict, float], None]:
    def run(result: dict, deadline: float) -> None:
        try:
            import bitsandbytes as bnb
        except Exception as e:
            raise Skipped(
                f"`import bitsandbytes` failed ({type(e).__name__}: {e}); the 4-bit and 8-bit checks did not run"
            ) from None
        result["bitsandbytes"] = getattr(bnb, "__version__", "?")
        device = cfg.device
        batch = lm_batch(2, 12, BNB_SHAPE["vocab_size"], device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bnb: "inputs will be cast from float32 to float16", vmap fallbacks
            for bits in (4, 8):
                key = f"{bits}bit"
                try:
                    model = quantize(tiny_qwen3(torch.device("cpu"), **BNB_SHAPE), bits, device)
                    with torch.no_grad():
                        model(**batch)  # bnb 8-bit moves CB/SCB into its state on the first forward
                    twin = dequantized_twin(model, device, **BNB_SHAPE)
                    result[key] = {v: bnb_checks(v, bits, model, twin, batch) for v in ("lora", "dora")}
                    result[key]["every_variant"] = {}
                    for name in sorted(REGISTRY):
                        if time.monotonic() > deadline - 3:
                            result[key]["every_variant"][name] = {"ok": False, "error": "not run: out of time"}
                            continue
                        result[key]["every_variant"][name] = bnb_variant_smoke(name, model, batch)
                except Exception as e:
                    if timed_out(e):
                        raise
                    result[key] = {
                        "ok": False,
                        "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc(),
                    }

    return run


def bnb_checks(name: str, bits: int, model: nn.Module, twin: nn.Module, batch: dict) -> dict[str, Any]:
    try:
        with torch.no_grad():
            base = model(**batch).logits
        before = snapshot(model)
        params = init_variant(name, model, batch)
        out: dict[str, Any] = {}
        with torch.no_grad():
            out["identity_max_abs"] = max_abs(lf.apply(model, params, batch).logits, base)
        params = perturbed(params)
        twin_params = copied(params)

        adapted = lf.apply(model, params, batch)
        adapted.loss.backward()
        reference = lf.apply(twin, twin_params, batch)
        reference.loss.backward()
        out["untouched"] = changes(model, before)
        out["logits_rel_vs_twin"] = rel_err(adapted.logits, reference.logits)
        out["base_effect_rel"] = rel_err(adapted.logits, base)  # how much the adapter moves the output
        grads, twin_grads = leaf_grads(params), leaf_grads(twin_params)
        out["missing_grads"] = [k for k, g in grads.items() if g is None or not torch.isfinite(g).all()]
        out["grads_rel_vs_twin"] = max(rel_err(grads[k], twin_grads[k]) for k in grads if grads[k] is not None)

        trainable, frozen = lf.split(params)
        func = torch.func.grad(lambda t: lf.apply(model, lf.combine(t, frozen), batch).loss)(trainable)
        out["func_vs_autograd_rel"] = max(rel_err(func[p][k], grads[f"{p}.{k}"]) for p, k, _ in trainable.leaves())
        out["untouched_after_func_grad"] = changes(model, before)
        tol = BNB_TOL[bits]
        out["tolerances"] = {**tol, "func_vs_autograd": BNB_FUNC_TOL[bits], "identity": 1e-6}
        out["ok"] = (
            out["identity_max_abs"] <= 1e-6
            and not out["untouched"]
            and not out["untouched_after_func_grad"]
            and not out["missing_grads"]
            and out["logits_rel_vs_twin"] <= tol["logits"]
            and out["grads_rel_vs_twin"] <= tol["grads"]
            and out["func_vs_autograd_rel"] <= BNB_FUNC_TOL[bits]
        )
        return out
    except Exception as e:
        if timed_out(e):
            raise
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def bnb_variant_smoke(name: str, model: nn.Module, batch: dict) -> dict[str, Any]:
    """Identity at init and finite gradients on the quantized base, model untouched."""
    try:
        with torch.no_grad():
            base = model(**batch).logits
        before = snapshot(model)
        params = init_variant(name, model, batch)
        with torch.no_grad():
            identity = max_abs(lf.apply(model, params, batch).logits, base)
        params = perturbed(params)
        lf.apply(model, params, batch).loss.backward()
        bad = [k for k, g in leaf_grads(params).items() if g is None or not torch.isfinite(g).all()]
        touched = changes(model, before)
        return {
            "identity_max_abs": identity,
            "bad_grads": bad[:5],
            "untouched": touched[:5],
            "ok": identity <= 1e-5 and not bad and not touched,
        }
    except Exception as e:
        if timed_out(e):
            raise
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


# ---- FSDP2 ----------------------------------------------------------------------------------------------------

FSDP_SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, head_dim=32, num_hidden_layers=3)


def fully_shard_fn():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def fsdp_worker(rank: int, world: int, device_type: str, init_file: str, out_dir: str | None) -> dict[str, Any]:
    """One rank of the FSDP2 check; with `out_dir` (spawned ranks) it writes its result there as JSON."""
    result: dict[str, Any] = {"rank": rank}
    try:
        result.update(fsdp_check(rank, world, device_type, init_file))
    except Exception as e:
        if timed_out(e):
            raise
        result.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    if out_dir is not None:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result, default=str))
    return result


def fsdp_check(rank: int, world: int, device_type: str, init_file: str) -> dict[str, Any]:
    import torch.distributed as dist

    fully_shard = fully_shard_fn()
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        out: dict[str, Any] = {"backend": backend, "world": world}
        batch = lm_batch(2 * world, 16, 128, device)
        rows = batch["input_ids"].shape[0] // world
        local = {k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()}
        for base_frozen in (True, False):
            model = tiny_qwen3(device, **FSDP_SHAPE)  # the same seed, so the same base on every rank
            if base_frozen:
                model.requires_grad_(False)
            reference = copy.deepcopy(model)
            params = perturbed(lf.init(reference, lf.LoRAConfig(r=4, alpha=8), seed=0))
            lf.apply(reference, params, batch).loss.backward()  # unsharded, the whole batch
            expected = {k: g.clone() for k, g in leaf_grads(params).items()}
            sharded_params = copied(params)

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            weight = model.model.layers[0].self_attn.q_proj.weight
            lf.apply(model, sharded_params, local).loss.backward()
            if world > 1:
                lf.all_reduce_grads(sharded_params)
            got = leaf_grads(sharded_params)
            missing = [k for k, g in got.items() if g is None]
            present = [k for k in expected if got.get(k) is not None]
            diff = max((max_abs(got[k], expected[k]) for k in present), default=float("nan"))
            rel = max((rel_err(got[k], expected[k]) for k in present), default=float("nan"))
            base_grads = [n for n, p in model.named_parameters() if p.grad is not None]
            out["base frozen" if base_frozen else "base requires grad"] = {
                "sharded_weight_type": type(weight).__name__,
                "missing_grads": missing[:5],
                "max_abs_diff": diff,
                "max_rel_diff": rel,
                "bitwise": not missing and all(torch.equal(got[k], expected[k]) for k in expected),
                "base_params_given_grad": len(base_grads),  # none, even when they require grad
                "ok": not missing and rel <= 1e-5 and not base_grads,
            }
            if base_frozen:
                trainable, frozen = lf.split(copied(params))

                def loss(t, model=model, frozen=frozen):
                    return lf.apply(model, lf.combine(t, frozen), local).loss

                try:
                    func = torch.func.grad(loss)(trainable)
                    func = {f"{p}.{k}": func[p][k] for p, k, _ in trainable.leaves()}
                    if world > 1:
                        lf.all_reduce_grads(func)
                    rel = max(rel_err(func[k], expected[k]) for k in expected)
                    out["torch.func.grad, base frozen"] = {"max_rel_diff": rel, "ok": rel <= 1e-5}
                except Exception as e:
                    if timed_out(e):
                        raise
                    out["torch.func.grad, base frozen"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        return out
    finally:
        dist.destroy_process_group()


def part_fsdp(cfg: Settings) -> Callable[[dict, float], None]:
    def run(result: dict, deadline: float) -> None:
        import torch.distributed as dist

        if not dist.is_available():
            raise Skipped("torch.distributed is not available in this torch build")
        try:
            fully_shard_fn()
        except ImportError as e:
            raise Skipped(f"FSDP2's fully_shard is not in this torch ({e})") from None
        device_type = cfg.device.type
        if cfg.fsdp_world is not None:
            world = cfg.fsdp_world
        else:
            world = torch.cuda.device_count() if device_type == "cuda" else 1
        if device_type == "cuda" and world > torch.cuda.device_count():
            raise Skipped(f"--fsdp-world {world} needs {world} GPUs, {torch.cuda.device_count()} visible")
        if dist.is_initialized():
            raise Skipped("a torch.distributed process group is already initialized in this process")
        result["world"] = world
        result["mode"] = "one in-process rank" if world == 1 else f"{world} spawned ranks"
        with tempfile.TemporaryDirectory() as tmp:
            init_file = os.path.join(tmp, "rendezvous")
            if world == 1:
                ranks = [fsdp_worker(0, 1, device_type, init_file, None)]
            else:
                ranks = spawn_ranks(world, device_type, init_file, tmp, deadline)
        result["ranks"] = ranks
        errors = [r.get("error") for r in ranks if r.get("error")]
        if errors:
            raise RuntimeError(f"FSDP2 check failed on a rank: {errors[0]}")

    return run


def spawn_ranks(world: int, device_type: str, init_file: str, tmp: str, deadline: float) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    context = mp.start_processes(
        _spawned_rank, args=(world, device_type, init_file, tmp), nprocs=world, join=False, start_method="spawn"
    )
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline - 3:
                raise PartTimeout("the spawned FSDP ranks did not finish in time")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def _spawned_rank(rank: int, world: int, device_type: str, init_file: str, tmp: str) -> None:
    fsdp_worker(rank, world, device_type, init_file, tmp)


# ---- perf -----------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    base: nn.Module  # requires_grad=True everywhere, as a freshly loaded HF model: lora_func trains on it
    frozen: nn.Module  # a copy with requires_grad=False: the ideal, and the K-adapter / mixed / compile sections
    batch: dict[str, torch.Tensor]
    lora: Any
    dora: Any
    peft: nn.Module
    peft_dora: nn.Module


def part_build(cfg: Settings, state: dict) -> Callable[[dict, float], None]:
    def run(result: dict, deadline: float) -> None:
        import bench_core as bc

        config = qwen3_06b_config(cfg.smoke)
        base = build_qwen3(config, cfg.device, cfg.dtype)
        frozen = copy.deepcopy(base).requires_grad_(False)
        batch = lm_batch(cfg.batch, cfg.seq, config.vocab_size, cfg.device)
        names = tuple(rf"\.{p}$" for p in PROJECTIONS)
        lora = lf.init(base, lf.LoRAConfig(r=RANK, alpha=ALPHA, target_names=names), seed=0)
        dora = lf.init(base, lf.DoRAConfig(r=RANK, alpha=ALPHA, target_names=names), seed=0)
        assert len(lora.targets) == 7 * config.num_hidden_layers, len(lora.targets)
        state["bench"] = Bench(
            base, frozen, batch, lora, dora, bc.peft_model(base).train(), bc.peft_model(base, use_dora=True).train()
        )
        result.update(
            model=(
                f"Qwen3ForCausalLM from Qwen3Config: hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
                f"intermediate {config.intermediate_size}, heads {config.num_attention_heads}/"
                f"{config.num_key_value_heads} x {config.head_dim}, vocab {config.vocab_size}, tied embeddings"
            ),
            dtype=str(cfg.dtype),
            base_params=sum(p.numel() for p in base.parameters()),
            adapter_params=lora.num_params(),
            batch=cfg.batch,
            seq=cfg.seq,
            rank=RANK,
            alpha=ALPHA,
            attention=getattr(base.config, "_attn_implementation", None),
        )
        if cfg.device.type == "cuda":
            result["allocated_gib_after_build"] = torch.cuda.memory_allocated(cfg.device) / 2**30

    return run


def part_train(cfg: Settings, state: dict) -> Callable[[dict, float], None]:
    def run(result: dict, deadline: float) -> None:
        import bench_core as bc

        b: Bench = state["bench"]
        train = {
            "ideal": bc.ideal_step(b.frozen, b.batch),
            "lora_func": bc.lora_func_step(b.base, b.lora, b.batch),
            "peft": bc.peft_step(b.peft, b.batch),
            "lora_func DoRA": bc.lora_func_step(b.base, b.dora, b.batch),
            "peft DoRA": bc.peft_step(b.peft_dora, b.batch),
        }
        losses = {name: fn().item() for name, fn in train.items()}
        result["losses_at_init"] = losses  # all adapters are the identity at init: the same loss (bf16 rounding)
        result["same_loss"] = all(abs(v - losses["ideal"]) <= 2e-2 * abs(losses["ideal"]) for v in losses.values())
        result["memory_bytes"] = {}
        for name, fn in train.items():
            result["memory_bytes"][name] = peak_memory(fn, cfg.device)
        stop_at = deadline - 0.2 * cfg.caps["perf: train"]
        result["times"] = summarize(alternate(train, cfg.repeats["train"], cfg.warmup, cfg.device, stop_at))
        t = {name: e["median_s"] for name, e in result["times"].items()}
        m = result["memory_bytes"]
        result["ratios"] = {
            "train: lora_func / ideal": t["lora_func"] / t["ideal"],
            "train: lora_func / peft": t["lora_func"] / t["peft"],
            "train: peft / ideal": t["peft"] / t["ideal"],
            "train: lora_func DoRA / lora_func LoRA": t["lora_func DoRA"] / t["lora_func"],
            "train: lora_func DoRA / peft DoRA": t["lora_func DoRA"] / t["peft DoRA"],
            "train: peft DoRA / peft LoRA": t["peft DoRA"] / t["peft"],
            "memory: lora_func / peft": m["lora_func"] / m["peft"],
            "memory: lora_func / ideal": m["lora_func"] / m["ideal"],
            "memory: lora_func DoRA / peft DoRA": m["lora_func DoRA"] / m["peft DoRA"],
        }

    return run


def part_inference(cfg: Settings, state: dict) -> Callable[[dict, float], None]:
    def run(result: dict, deadline: float) -> None:
        import bench_core as bc

        b: Bench = state["bench"]
        inputs = {"input_ids": b.batch["input_ids"]}
        merged = {k: v.detach() for k, v in lf.merge(b.base, b.lora).items()}
        b.base.eval()
        b.peft.eval()
        try:
            infer = {
                "base": bc.no_grad(lambda: b.base(**inputs).logits),
                "lora_func unmerged": bc.no_grad(lambda: lf.apply(b.base, b.lora, inputs).logits),
                "merged": bc.no_grad(lambda: torch.func.functional_call(b.base, merged, (), inputs).logits),
                "peft unmerged": bc.no_grad(lambda: b.peft(**inputs).logits),
            }
            outputs = {name: fn() for name, fn in infer.items()}
            result["max_abs_vs_base"] = {name: max_abs(o, outputs["base"]) for name, o in outputs.items()}
            del outputs
            stop_at = deadline - 0.1 * cfg.caps["perf: inference"]
            result["times"] = summarize(alternate(infer, cfg.repeats["inference"], cfg.warmup, cfg.device, stop_at))
        finally:
            b.base.train()
            b.peft.train()
        t = {name: e["median_s"] for name, e in result["times"].items()}
        result["ratios"] = {
            "inference: unmerged / base": t["lora_func unmerged"] / t["base"],
            "inference: merged / base": t["merged"] / t["base"],
            "inference: peft unmerged / base": t["peft unmerged"] / t["base"],
        }

    return run


def k_adapters(model: nn.Module, count: int, seed0: int = 0) -> list:
    """`count` LoRA adapters with nonzero B (trained adapters, not the identity): bench_functional's, on any device."""
    cfg = lf.LoRAConfig(r=RANK, alpha=ALPHA, target_names=tuple(rf"{p}$" for p in PROJECTIONS))
    return [perturbed(lf.init(model, cfg, seed=seed0 + s), scale=0.01, seed=100 + s) for s in range(count)]


def part_k_adapters(cfg: Settings, state: dict) -> Callable[[dict, float], None]:
    def run(result: dict, deadline: float) -> None:
        import bench_functional as bf
        from torch.nn.attention import SDPBackend, sdpa_kernel

        b: Bench = state["bench"]
        model, batch = b.frozen, b.batch
        params = k_adapters(model, K)
        stacked = lf.stack(params)
        trainable, frozen = lf.split(stacked)
        peft = bf.peft_model(model, params)
        embed = model.get_input_embeddings()
        rows = batch["input_ids"].shape[0]
        repeated = {name: t.repeat(K, *[1] * (t.dim() - 1)) for name, t in batch.items()}
        ids = torch.arange(K, device=cfg.device).repeat_interleave(rows)

        def loss_of(t):
            return lf.apply(model, lf.combine(t, frozen), batch).loss

        def vmapped():
            return torch.func.vmap(torch.func.grad_and_value(loss_of))(trainable)

        def vmapped_math_sdpa():
            with sdpa_kernel([SDPBackend.MATH]):
                return vmapped()

        def mixed_rows():
            (lf.apply(model, stacked, repeated, adapter_ids=ids).loss * K).backward()
            clear_grads(stacked)

        def loop():
            for p in params:
                lf.apply(model, p, batch).loss.backward()
                clear_grads(p)

        def peft_loop():
            for k in range(K):
                peft.set_adapter(f"adapter{k}")
                peft(**batch).loss.backward()
            peft.zero_grad(set_to_none=True)

        def ideal():
            for _ in range(K):
                x = embed(batch["input_ids"]).detach().requires_grad_()
                model(inputs_embeds=x, labels=batch["labels"]).loss.backward()

        contenders = {
            "K x ideal": ideal,
            "lora_func vmap": vmapped,
            "lora_func vmap, SDPA math backend": vmapped_math_sdpa,
            "lora_func adapter_ids on K x batch rows": mixed_rows,
            "lora_func loop": loop,
            "PEFT set_adapter loop": peft_loop,
        }
        # What is timed computes the same thing: vmap's K gradients against the loop's (to bf16 rounding).
        grads, _ = vmapped()
        loop_grads = []
        for p in params:
            lf.apply(model, p, batch).loss.backward()
            loop_grads.append({f"{path}.{k}": t.grad.clone() for path, k, t in p.leaves()})
            clear_grads(p)
        result["vmap_vs_loop_rel"] = max(
            rel_err(grads[path][k][i], loop_grads[i][f"{path}.{k}"])
            for path, k, _ in trainable.leaves()
            for i in range(K)
        )
        del grads, loop_grads
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cfg.device.type == "cuda":
                result["memory_bytes"] = {name: peak_memory(fn, cfg.device) for name, fn in contenders.items()}
            stop_at = deadline - 0.1 * cfg.caps["perf: k_adapters"]
            result["times"] = summarize(
                alternate(contenders, cfg.repeats["k_adapters"], 1, cfg.device, stop_at, min_repeats=1)
            )
        result["warnings"] = sorted({str(w.message)[:200] for w in caught})
        t = {name: e["median_s"] for name, e in result["times"].items()}
        ideal_s = t["K x ideal"]
        result["ratios"] = {
            "K adapters: vmap / (K x ideal)": t["lora_func vmap"] / ideal_s,
            "K adapters: vmap (SDPA math) / (K x ideal)": t["lora_func vmap, SDPA math backend"] / ideal_s,
            "K adapters: adapter_ids on K x rows / (K x ideal)": t["lora_func adapter_ids on K x batch rows"] / ideal_s,
            "K adapters: loop / (K x ideal)": t["lora_func loop"] / ideal_s,
            "K adapters: PEFT loop / (K x ideal)": t["PEFT set_adapter loop"] / ideal_s,
            "K adapters: PEFT loop / vmap": t["PEFT set_adapter loop"] / t["lora_func vmap"],
            "K adapters: PEFT loop / best lora_func": t["PEFT set_adapter loop"]
            / min(t[n] for n in t if n.startswith("lora_func")),
        }

    return run


def part_mixed(cfg: Settings, state: dict) -> Callable[[dict, float], None]:
    def run(result: dict, deadline: float) -> None:
        import bench_functional as bf

        b: Bench = state["bench"]
        model = b.frozen
        params = k_adapters(model, K, seed0=50)
        stacked = lf.stack(params)
        peft = bf.peft_model(model, params)
        batch = {"input_ids": lm_batch(K, cfg.seq, model.config.vocab_size, cfg.device, seed=7)["input_ids"]}
        ids = torch.arange(K, device=cfg.device)
        names = [f"adapter{k}" for k in range(K)]
        model.eval()
        peft.eval()  # PEFT refuses `adapter_names` in training mode
        try:
            with torch.no_grad():
                ours = lf.apply(model, stacked, batch, adapter_ids=ids).logits
                theirs = peft(**batch, adapter_names=names).logits
                single = lf.apply(model, params[3], {"input_ids": batch["input_ids"][3:4]}).logits
            result["lora_func_vs_peft_max_abs"] = max_abs(ours, theirs)
            result["row3_vs_its_adapter_alone_max_abs"] = max_abs(ours[3:4], single)
            del ours, theirs, single
            contenders = {
                "base forward": lambda: model(**batch),
                "lora_func adapter_ids": lambda: lf.apply(model, stacked, batch, adapter_ids=ids),
                "PEFT adapter_names": lambda: peft(**batch, adapter_names=names),
            }
            with torch.no_grad():
                stop_at = deadline - 0.1 * cfg.caps["perf: mixed"]
                result["times"] = summarize(
                    alternate(contenders, cfg.repeats["mixed"], cfg.warmup, cfg.device, stop_at)
                )
        finally:
            model.train()
        t = {name: e["median_s"] for name, e in result["times"].items()}
        result["ratios"] = {
            "mixed batch: adapter_ids / base": t["lora_func adapter_ids"] / t["base forward"],
            "mixed batch: PEFT adapter_names / base": t["PEFT adapter_names"] / t["base forward"],
            "mixed batch: PEFT adapter_names / adapter_ids": t["PEFT adapter_names"] / t["lora_func adapter_ids"],
        }

    return run


def part_compile(cfg: Settings, state: dict) -> Callable[[dict, float], None]:
    def run(result: dict, deadline: float) -> None:
        b: Bench = state["bench"]
        model, batch = b.frozen, b.batch
        first, second = k_adapters(model, 2, seed0=90)
        trainable, frozen = lf.split(first)
        leaves = lf.trainable_leaves(first)

        def loss_fn(t, batch):
            return lf.apply(model, lf.combine(t, frozen), batch).loss

        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        start = time.monotonic()
        try:
            compiled = torch.compile(loss_fn, fullgraph=True)  # fullgraph: a graph break is an error
            compiled_loss = compiled(trainable, batch)
            result["fullgraph"] = True
        except Exception as e:
            if timed_out(e):
                raise
            # Record why one graph failed, then measure what torch.compile gives with graph breaks allowed.
            result["fullgraph"] = False
            result["fullgraph_error"] = f"{type(e).__name__}: {str(e)[:600]}"
            torch._dynamo.reset()
            counters.clear()
            compiled = torch.compile(loss_fn)
            compiled_loss = compiled(trainable, batch)
            result["graph_breaks"] = {reason[:200]: n for reason, n in counters["graph_break"].items()}
        compiled_loss.backward()
        harness.synchronize(cfg.device)
        result["first_compiled_call_s"] = time.monotonic() - start
        compiled_grads = {k: g.clone() for k, g in leaf_grads(first).items()}
        clear_grads(first)
        eager_loss = loss_fn(trainable, batch)
        eager_loss.backward()
        eager_grads = leaf_grads(first)
        result["compiled_vs_eager"] = {
            "loss_rel": rel_err(compiled_loss, eager_loss),
            "grads_rel": max(rel_err(compiled_grads[k], eager_grads[k]) for k in eager_grads),
        }
        clear_grads(first)
        # A second adapter through the same compiled function: its own result, not the first adapter's.
        other_t, other_frozen = lf.split(second)
        assert lf.combine(other_t, other_frozen).config == first.config
        # Called with grad enabled, as compiled: under no_grad dynamo would compile another graph.
        second_loss = compiled(other_t, batch).detach()
        result["second_adapter_rel"] = rel_err(second_loss, loss_fn(other_t, batch))
        result["second_vs_first_rel"] = rel_err(second_loss, compiled(trainable, batch))
        result["unique_graphs"] = counters["stats"]["unique_graphs"]

        def eager():
            loss_fn(trainable, batch).backward()
            for t in leaves:
                t.grad = None

        def inductor():
            compiled(trainable, batch).backward()
            for t in leaves:
                t.grad = None

        stop_at = deadline - 0.05 * cfg.caps["perf: compile"]
        contenders = {"eager step": eager, "compiled step (inductor)": inductor}
        result["times"] = summarize(alternate(contenders, cfg.repeats["compile"], cfg.warmup, cfg.device, stop_at))
        t = {name: e["median_s"] for name, e in result["times"].items()}
        result["ratios"] = {"compile: compiled / eager step": t["compiled step (inductor)"] / t["eager step"]}

    return run


# ---- summary --------------------------------------------------------------------------------------------------

PERF_PARTS = ("perf: train", "perf: inference", "perf: k_adapters", "perf: mixed", "perf: compile")


def perf_targets() -> dict[str, tuple[str, float]]:
    """docs/performance.md's targets (bench_core.TARGETS) and the GPU targets for K adapters and mixed batches."""
    import bench_core as bc

    targets = {name: ("<" if name.startswith("memory") else "<=", limit) for name, limit in bc.TARGETS.items()}
    targets["memory: lora_func DoRA / peft DoRA"] = ("<", 1.0)
    targets["K adapters: vmap / (K x ideal)"] = ("<=", 1.10)
    targets["mixed batch: adapter_ids / base"] = ("<=", 1.05)
    # The GPU targets for K adapters and mixed batches (docs/performance.md): faster than PEFT.
    targets["K adapters: PEFT loop / best lora_func"] = (">", 1.0)
    targets["mixed batch: PEFT adapter_names / adapter_ids"] = (">", 1.0)
    return targets


def met(value: float, op: str, limit: float) -> bool:
    return {"<": value < limit, "<=": value <= limit, ">": value > limit}[op]


def collect_ratios(report: dict) -> dict[str, Any]:
    ratios = {}
    for name in PERF_PARTS:
        ratios.update(report["parts"].get(name, {}).get("result", {}).get("ratios", {}))
    targets = perf_targets()
    return {
        name: {
            "value": value,
            **(
                {"target": f"{targets[name][0]} {targets[name][1]}", "met": met(value, *targets[name])}
                if name in targets
                else {}
            ),
        }
        for name, value in ratios.items()
    }


def failures(report: dict) -> list[str]:
    """Parts that did not complete, and checks that failed (performance targets are not failures)."""
    bad = []
    for name, entry in report["parts"].items():
        if entry["status"] in ("error", "timeout"):
            bad.append(f"{name}: {entry['status']}: {entry.get('error', '')[:200]}")
    result = report["parts"].get("contract", {}).get("result", {})
    bad += [f"contract {v}: {c.get('error') or 'a check failed'}" for v, c in result.items() if not c.get("ok")]
    result = report["parts"].get("bnb", {}).get("result", {})
    for bits in ("4bit", "8bit"):
        entry = result.get(bits, {})
        if "error" in entry:
            bad.append(f"bnb {bits}: {entry['error'][:200]}")
        bad += [f"bnb {bits} {v}" for v in ("lora", "dora") if v in entry and not entry[v].get("ok")]
        bad += [f"bnb {bits} {v} (every variant)" for v, c in entry.get("every_variant", {}).items() if not c.get("ok")]
    for rank in report["parts"].get("fsdp", {}).get("result", {}).get("ranks", []):
        for case, c in rank.items():
            if isinstance(c, dict) and not c.get("ok"):
                why = c.get("error") or (
                    f"{c['base_params_given_grad']} base parameters got a gradient"
                    if c.get("base_params_given_grad")
                    else f"adapter gradients differ (max rel {c.get('max_rel_diff')}, missing {c.get('missing_grads')})"
                )
                bad.append(f"fsdp rank {rank['rank']}, {case}: {why}")
    compiled = report["parts"].get("perf: compile", {}).get("result", {})
    if compiled.get("fullgraph") is False:
        bad.append(f"perf: compile: no single graph with fullgraph=True ({compiled.get('fullgraph_error', '')[:200]})")
    train = report["parts"].get("perf: train", {}).get("result", {})
    if train.get("same_loss") is False:
        bad.append("perf: train: contenders compute different losses at init")
    return bad


def one_line(text: Any, limit: int) -> str:
    """`text` on one line (markdown tables and bullets), cut at `limit` characters."""
    return " ".join(str(text).split())[:limit]


def fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}g}" if (x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4)) else f"{x:.{digits}f}"
    return str(x)


def markdown(report: dict) -> str:
    setup = report["setup"]
    lines = [
        f"## lora_func GPU checks — {setup.get('device_name', setup['device'])}"
        + (" (SMOKE: tiny shapes, not a measurement)" if setup["smoke"] else ""),
        "",
        f"torch {setup['torch']}, transformers {setup.get('transformers')}, peft {setup.get('peft')}, "
        f"bitsandbytes {setup.get('bitsandbytes')}; total {report.get('elapsed_s', 0):.0f} s",
        "",
        "| part | status | time s | note |",
        "|---|---|---:|---|",
    ]
    for name, entry in report["parts"].items():
        note = entry.get("error") or entry.get("reason") or ""
        status = entry["status"] if entry["status"] == "ok" else f"**{entry['status'].upper()}**"
        lines.append(f"| {name} | {status} | {entry.get('elapsed_s', '')} | {one_line(note, 160)} |")

    contract = report["parts"].get("contract", {}).get("result", {})
    if contract:
        lines += [
            "",
            "### Contract on the device (tiny Qwen3, fp32)",
            "",
            "| variant | ok | identity max abs | func vs autograd rel | save/load bitwise | merge max abs | problems |",
            "|---|---|---:|---:|---|---:|---|",
        ]
        for name, c in contract.items():
            problems = c.get("error") or "; ".join(f"{k}: {v[:2]}" for k, v in c.items() if isinstance(v, list) and v)
            lines.append(
                f"| {name} | {'yes' if c.get('ok') else '**NO**'} | {fmt(c.get('identity_max_abs', ''))} | "
                f"{fmt(c.get('func_vs_autograd_rel', ''))} | {c.get('save_load_bitwise', '')} | "
                f"{fmt(c.get('merge_max_abs', ''))} | {one_line(problems, 120)} |"
            )

    bnb = report["parts"].get("bnb", {})
    if bnb.get("status") == "skipped":
        lines += ["", f"### bitsandbytes: **SKIPPED** — {bnb.get('reason')}"]
    elif bnb.get("result"):
        lines += [
            "",
            "### bitsandbytes bases vs the dequantized float twin (relative errors)",
            "",
            "| base | variant | ok | identity max abs | logits rel | grads rel | func vs autograd rel "
            "| adapter effect rel |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for bits in ("4bit", "8bit"):
            entry = bnb["result"].get(bits, {})
            if "error" in entry:
                lines.append(f"| {bits} | | **NO** | {one_line(entry['error'], 100)} | | | | |")
                continue
            for v in ("lora", "dora"):
                c = entry.get(v, {})
                if "error" in c:
                    lines.append(f"| {bits} | {v} | **NO** | {one_line(c['error'], 100)} | | | | |")
                    continue
                lines.append(
                    f"| {bits} | {v} | {'yes' if c.get('ok') else '**NO**'} | {fmt(c.get('identity_max_abs'))} | "
                    f"{fmt(c.get('logits_rel_vs_twin'))} | {fmt(c.get('grads_rel_vs_twin'))} | "
                    f"{fmt(c.get('func_vs_autograd_rel'))} | {fmt(c.get('base_effect_rel'))} |"
                )
            every = entry.get("every_variant", {})
            if every:
                bad = [n for n, c in every.items() if not c.get("ok")]
                lines.append(
                    f"\n{bits}, every variant (identity, finite gradients, untouched): "
                    f"{len(every) - len(bad)}/{len(every)} ok" + (f"; **failed**: {', '.join(bad)}" if bad else "")
                )

    fsdp = report["parts"].get("fsdp", {})
    if fsdp.get("result", {}).get("ranks"):
        lines += ["", f"### FSDP2 ({fsdp['result'].get('mode')}): adapter gradients vs the unsharded base", ""]
        lines += [
            "| rank | case | ok | max rel diff | bitwise | base params given grad | note |",
            "|---|---|---|---:|---|---:|---|",
        ]
        for rank in fsdp["result"]["ranks"]:
            for case, c in rank.items():
                if isinstance(c, dict):
                    ok = "yes" if c.get("ok") else "**NO**"
                    lines.append(
                        f"| {rank['rank']} | {case} | {ok} | {fmt(c.get('max_rel_diff', ''))} | {c.get('bitwise', '')} "
                        f"| {c.get('base_params_given_grad', '')} | {one_line(c.get('error', ''), 100)} |"
                    )
    elif fsdp.get("status") in ("skipped", "error", "timeout"):
        lines += ["", f"### FSDP2: {fsdp['status']} — {fsdp.get('reason') or fsdp.get('error')}"]

    build = report["parts"].get("perf: build", {}).get("result", {})
    if build:
        shape = f"batch {build.get('batch')} x seq {build.get('seq')}"
        lines += ["", f"### Performance: {build.get('model')}, {build.get('dtype')}, {shape}, LoRA r={RANK}"]
    for name in PERF_PARTS:
        result = report["parts"].get(name, {}).get("result", {})
        times = result.get("times")
        if not times:
            continue
        memory = result.get("memory_bytes", {})
        lines += ["", f"| {name} | median ms | min ms | n | peak MiB |", "|---|---:|---:|---:|---:|"]
        for contender, e in times.items():
            mib = f"{memory[contender] / 2**20:.1f}" if contender in memory else ""
            lines.append(f"| {contender} | {1000 * e['median_s']:.2f} | {1000 * e['min_s']:.2f} | {e['n']} | {mib} |")
    ratios = report.get("ratios", {})
    if ratios:
        lines += ["", "| ratio | value | target | met |", "|---|---:|---|---|"]
        for name, r in ratios.items():
            mark = "" if "met" not in r else ("yes" if r["met"] else "**no**")
            lines.append(f"| {name} | {r['value']:.3f} | {r.get('target', '')} | {mark} |")
    compile_result = report["parts"].get("perf: compile", {}).get("result", {})
    if "first_compiled_call_s" in compile_result:
        versus = compile_result["compiled_vs_eager"]
        lines.append(
            f"\ncompile: first call {compile_result['first_compiled_call_s']:.1f} s, "
            f"{compile_result.get('unique_graphs')} graph(s); compiled vs eager loss rel {fmt(versus['loss_rel'])}, "
            f"grads rel {fmt(versus['grads_rel'])}; second adapter vs eager rel "
            f"{fmt(compile_result.get('second_adapter_rel', float('nan')))}"
        )
        if compile_result.get("fullgraph") is False:
            lines.append(
                "\n**fullgraph=True failed**, timed with graph breaks allowed: "
                f"{one_line(compile_result['fullgraph_error'], 300)}"
            )
    bad = report.get("failures", [])
    lines += ["", f"**{len(bad)} failure(s)**" + (":" if bad else "")] + [f"- {one_line(b, 300)}" for b in bad[:40]]
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------------------------


def versions() -> dict[str, Any]:
    found = {}
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            module = __import__(name)
            found[name] = getattr(module, "__version__", "?")
        except Exception as e:
            found[name] = f"not importable ({type(e).__name__}: {str(e)[:120]})"
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes and few steps: a run-through, not a measurement"
    )
    parser.add_argument("--out", type=Path, default=Path("results/gpu.json"))
    parser.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="all parts together, seconds")
    parser.add_argument(
        "--parts", nargs="+", choices=("contract", "bnb", "fsdp", "perf"), default=("contract", "bnb", "fsdp", "perf")
    )
    parser.add_argument("--fsdp-world", type=int, default=None, help="ranks for the FSDP check (default: visible GPUs)")
    args = parser.parse_args(argv)
    harness.PROGRESS = False
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU machine, or use --device cpu --smoke")

    cfg = settings(args)
    report: dict[str, Any] = {
        "setup": {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": str(cfg.device),
            "device_name": torch.cuda.get_device_name(cfg.device)
            if cfg.device.type == "cuda"
            else platform.processor() or "cpu",
            "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "smoke": cfg.smoke,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            **versions(),
            "lora_func": None if lf is None else str(Path(lf.__file__).parent),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "budget_s": args.budget_s,
            "argv": sys.argv[1:] if argv is None else argv,
        },
        "parts": {},
    }
    run = Run(cfg, args.out, args.budget_s, report)
    if lf is None:
        report["parts"]["import lora_func"] = {"status": "error", "error": LORA_FUNC_IMPORT_ERROR}
        report["failures"] = [f"import lora_func: {LORA_FUNC_IMPORT_ERROR}"]
        run.write()
        print(markdown(report))
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks compare against fp32 references
    torch.backends.cudnn.allow_tf32 = False

    def finish() -> str:
        try:
            with run.lock:
                report["ratios"] = collect_ratios(report)
                report["failures"] = failures(report)
        except Exception as e:  # the summary must not lose the measurements
            report["failures"] = report.get("failures", []) + [f"summary: {type(e).__name__}: {e}"]
        run.write()
        try:
            return markdown(report)
        except Exception as e:
            return f"(markdown summary failed: {type(e).__name__}: {e}; see {run.out})"

    def watchdog() -> None:
        print("[gpu.py] watchdog: past the total budget; writing what there is and exiting", file=sys.stderr)
        try:
            for entry in report["parts"].values():
                if entry["status"] == "running":
                    entry.update(status="timeout", error="ended by the watchdog")
            print(finish(), flush=True)
        except Exception:
            traceback.print_exc()
        finally:
            os._exit(3)

    timer = threading.Timer(args.budget_s + WATCHDOG_GRACE_S, watchdog)
    timer.daemon = True
    timer.start()

    if "contract" in args.parts:
        run.part("contract", part_contract(cfg))
    if "bnb" in args.parts:
        run.part("bnb", part_bnb(cfg))
    if "fsdp" in args.parts:
        run.part("fsdp", part_fsdp(cfg))
    if "perf" in args.parts:
        state: dict[str, Any] = {}
        run.part("perf: build", part_build(cfg, state))
        for name, make in (
            ("perf: train", part_train),
            ("perf: inference", part_inference),
            ("perf: k_adapters", part_k_adapters),
            ("perf: mixed", part_mixed),
            ("perf: compile", part_compile),
        ):
            run.part(name, make(cfg, state), needs=("perf: build",))
        state.clear()
    timer.cancel()
    print(finish())
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
