"""The one timing harness every benchmark uses: contenders alternate in one process, medians, ratios.

    samples = harness.alternate({"ideal": ideal, "lora_func": step, "peft": peft_step}, repeats=15, warmup=3)
    t = harness.medians(samples)  # {name: median wall seconds}
    harness.ratio(t, "lora_func", "peft")

Contenders share one process and are timed alternately: each round runs every contender once, in an
order that rotates, so drift in machine load (other processes, thermal state, a GPU's clocks) spreads
over all of them instead of biasing one. Warmup rounds run first, untimed; `gc.collect()` runs before
every timed call, outside the timing. Each call is timed by two clocks:
- wall: `time.perf_counter` around the call; on a GPU, CUDA events around a call synchronized before
  and after (`device`).
- cpu: process CPU time (all threads). On a machine shared with other jobs, wall time mostly measures
  the other jobs at 2 threads and more; one thread and CPU time are then the better guide to relative cost.
Medians are the reported figure; a ratio is of two medians taken in the same process.

Peak memory (`peak_bytes`) is the most bytes torch holds during one call above what it held before: on a GPU
from the CUDA allocator's statistics, on the CPU from torch's profiler, which records every allocation and
free of torch's CPU allocator with its size (deterministic, and only tensors: `tracemalloc` does not see
torch's allocator, and process RSS counts the Python heap, caching and fragmentation).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the lora_func of this checkout, not an installed one

from lora_func._progress import progress  # noqa: E402

PROGRESS = True  # tqdm bars on stderr; each script's `--no-progress` turns them off

Samples = dict[str, dict[str, list[float]]]  # {contender: {"wall": [s, ...], "cpu": [s, ...]}}


def arguments(
    doc: str, out: str, *, repeats: int | None = None, threads: int | None = 2, warmup: bool = False
) -> argparse.ArgumentParser:
    """The flags every benchmark script takes: `--quick` (a smoke run, not a measurement), `--out` (its JSON, default
    `out`), `--repeats` (default `repeats`; None: the script picks, by `--quick`), `--threads` (torch's, default
    `threads`; None: no such flag), `--no-progress`; and `--warmup` (default None) with `warmup`. The description
    is `doc`'s first paragraph. A script adds its own flags, then calls `parse`."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke run, not a measurement")
    parser.add_argument("--out", type=Path, default=Path(out), help=f"the JSON it writes (default {out})")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed calls per contender")
    if warmup:
        parser.add_argument("--warmup", type=int, default=None, help="untimed rounds before the timed ones")
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help=f"torch threads (default {threads})")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, applied: progress bars on or off (`PROGRESS`), torch's threads where it has
    `--threads`."""
    global PROGRESS
    args = parser.parse_args(argv)
    PROGRESS = args.progress
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    return args


def write_json(result: dict, path: Path, **dump) -> None:
    """`result` as indented JSON at `path` (its folder made), and a line on stderr saying so; `dump`: `json.dumps`'s
    keywords (`default=str`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, **dump))
    print(f"\nwrote {path}", file=sys.stderr)


def print_ratios(ratios: dict[str, float], targets: dict[str, dict]) -> None:
    """The markdown table of `ratios` against their `targets` ({"target": limit, "met": bool, "sense": "<=" unless
    given}), on stdout."""
    print("\n| ratio | value | target |")
    print("|---|---:|---|")
    for name, value in ratios.items():
        t = targets.get(name)
        shown = "" if t is None else f"{t.get('sense', '<=')} {t['target']:.2f} ({'met' if t['met'] else 'NOT met'})"
        print(f"| {name} | {value:.3f} | {shown} |")


def rounds(repeats: int, label: str) -> Iterable[int]:
    """range(repeats), under a progress bar when PROGRESS is on."""
    return progress(range(repeats), PROGRESS, label)


def synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device | None) -> tuple[float, float]:
    """(wall, cpu) seconds of one call of `fn`."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cpu = time.process_time()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def alternate(
    contenders: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    label: str = "repeats",
    *,
    device: torch.device | None = None,
    stop_at: float | None = None,
    min_repeats: int = 2,
) -> Samples:
    """Wall and process-CPU seconds per call of each contender: `warmup` untimed rounds, then `repeats`
    rounds, each running every contender once in an order that rotates. `stop_at` (a `time.monotonic()`
    deadline) ends the rounds early, after at least `min_repeats`."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    synchronize(device)
    samples: Samples = {name: {"wall": [], "cpu": []} for name in names}
    for i in rounds(repeats, label):
        if stop_at is not None and i >= min_repeats and time.monotonic() > stop_at:
            break
        for name in names[i % len(names) :] + names[: i % len(names)]:
            gc.collect()
            wall, cpu = _timed(contenders[name], device)
            samples[name]["wall"].append(wall)
            samples[name]["cpu"].append(cpu)
    return samples


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def medians(samples: Samples, clock: str = "wall") -> dict[str, float]:
    """{contender: median seconds} by `clock` ("wall" or "cpu")."""
    return {name: median(s[clock]) for name, s in samples.items() if s[clock]}


def walls(samples: Samples) -> dict[str, list[float]]:
    """{contender: wall seconds per call}."""
    return {name: s["wall"] for name, s in samples.items()}


def alternate_walls(
    contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, label: str = "repeats", **timing
) -> dict[str, list[float]]:
    """`alternate`, wall seconds only: {contender: seconds per call}; `timing`: `alternate`'s keywords."""
    return walls(alternate(contenders, repeats, warmup, label, **timing))


def ratio(times: dict[str, float], name: str, reference: str) -> float:
    """times[name] / times[reference], two medians from the same process."""
    return times[name] / times[reference]


def peak_bytes(fn: Callable[[], object], device: torch.device | None = None) -> int:
    """Peak bytes torch allocates during `fn()` above what was allocated when it started: the CUDA allocator's
    statistics on a CUDA `device`, else the running sum of torch's CPU allocations and frees (its profiler)."""
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = prof.profiler.kineto_results.experimental_event_tree()
    allocations = sorted(
        (node.start_time_ns, node.extra_fields.alloc_size) for node in walk(events) if node.tag == _EventType.Allocation
    )
    live = peak = 0
    for _, size in allocations:
        live += size
        peak = max(peak, live)
    return peak
