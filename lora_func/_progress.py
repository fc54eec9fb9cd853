"""Progress bars for long-running work (calibration, the demo, the benchmarks): tqdm when it is installed."""

from __future__ import annotations

from collections.abc import Iterable


def progress(iterable: Iterable, enabled: bool, desc: str) -> Iterable:
    """`iterable` under a tqdm bar on stderr that clears itself when done; as it is when `enabled` is False
    or tqdm is not installed (it is an optional dependency: `pip install lora_func[progress]`)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, leave=False)
