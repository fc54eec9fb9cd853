"""Execute the notebooks top to bottom, as `nox -s notebooks` does: `python notebooks/run.py [name ...]`.

Each notebook is a jupytext percent-format `.py` file (`NN_name.py`). It is converted in memory, run by
a Jupyter kernel (nbclient) from the repository root, and the executed copy, with its outputs and
inline plots, is written to `results/notebooks/NN_name.ipynb` next to the plots the notebook saves. A
failing cell (an assertion about the library) fails the run. Torch runs on `--threads` threads
(default 1) so that the timings the notebooks print are comparable between machines and runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = ROOT / "results" / "notebooks"


def find_notebooks(names: list[str]) -> list[Path]:
    """All `NN_*.py` notebooks in order, or those whose file name contains one of `names`."""
    found = sorted(HERE.glob("[0-9][0-9]_*.py"))
    if not names:
        return found
    picked = [path for path in found if any(name in path.name for name in names)]
    missing = [name for name in names if not any(name in path.name for path in found)]
    if missing:
        raise SystemExit(f"run: no notebook matches {missing}; have {[p.name for p in found]}")
    return picked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute the lora_func notebooks top to bottom.")
    parser.add_argument("names", nargs="*", help="run only notebooks whose file name contains one of these")
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads in the kernel (default 1)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default 600)")
    args = parser.parse_args(argv)
    paths = find_notebooks(args.names)

    # The kernel inherits this environment: thread count, offline hub, plots inline in the saved notebook.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"

    import jupytext
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    OUT.mkdir(parents=True, exist_ok=True)
    failed, seconds = [], {}
    for path in paths:
        notebook = jupytext.read(path)
        client = NotebookClient(
            notebook, timeout=args.timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
        )
        start = time.perf_counter()
        try:
            client.execute()
        except CellExecutionError as error:
            failed.append(path.name)
            print(error, file=sys.stderr)
        finally:
            seconds[path.name] = time.perf_counter() - start
            nbformat.write(notebook, OUT / f"{path.stem}.ipynb")
        status = "FAILED" if path.name in failed else "ok"
        print(f"{path.name}: {status} in {seconds[path.name]:.1f} s -> {OUT / path.stem}.ipynb", flush=True)
    print(f"{len(paths)} notebooks in {sum(seconds.values()):.1f} s on {args.threads} thread(s)")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
