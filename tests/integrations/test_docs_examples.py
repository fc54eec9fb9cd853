"""Every ```python block of README.md and docs/ runs as written (extracted from the pages, so the docs cannot rot).

Each page runs top to bottom in one namespace that starts from a small hidden setup (`context`: the tiny Qwen3 of
the training guide, a batch, a loader, prompts, adapters), in a temporary directory. The named examples that a
test below checks against a reference (HF Trainer, accelerate, DDP on 2 gloo processes, freeze, cast, stacking
different ranks, per-row losses) run there, with the page's `setup` block, instead of in the page run. A block that
cannot run in one process is marked `<!-- not run: why -->` in its page and listed in `NOT_RUN`.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.multiprocessing as mp
from components import tiny_qwen3

import lora_func as lf

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))]
TIMEOUT_S = 120
# Blocks that need several processes (a `torch.distributed` process group of several ranks): page -> count.
NOT_RUN = {"docs/distributed.md": 5}
# Named examples run by their own test below (`trainer-schedule`: in test_trainer_schedule.py), with the `setup` block,
# not again in the page run.
CHECKED = {"trainer", "trainer-schedule", "accelerate", "ddp", "freeze", "cast", "pad", "per-row-losses"}
FENCE = re.compile(r"(?:<!-- (example|not run): ([^>]*?) -->[ \t]*\n)?```python\n(.*?)^```", re.S | re.M)


class Block(NamedTuple):
    page: str
    line: int
    name: str | None  # `<!-- example: NAME -->`
    not_run: str | None  # `<!-- not run: WHY -->`
    code: str


def blocks(page: str) -> list[Block]:
    text = (ROOT / page).read_text()
    found = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start(3))  # the fence line, 1-based: the code starts on the next one
        kind, label = m.group(1), m.group(2)
        found.append(
            Block(page, line, label if kind == "example" else None, label if kind == "not run" else None, m.group(3))
        )
    return found


def example(name: str) -> str:
    """The python block after `<!-- example: NAME -->` in README.md or docs/."""
    named = [b for page in PAGES for b in blocks(page) if b.name == name]
    assert len(named) == 1, f"{len(named)} examples named {name!r} in README.md and docs/"
    return named[0].code


def execute(block: Block, namespace: dict) -> None:
    # A blank line per line above the block, so that a traceback names the page's own line.
    exec(compile("\n" * block.line + block.code, block.page, "exec"), namespace)


def run(*names: str) -> dict:
    namespace: dict = {"__name__": "docs"}
    for name in names:
        exec(compile(example(name), f"example {name}", "exec"), namespace)
    return namespace


def context() -> dict:
    """The names the pages' blocks take from their surroundings: the training guide's tiny Qwen3 and rows, a batch
    of 4 (`batch`), a loader of two batches, one prompt and four, an adapter (`params`) and four LoRA adapters with
    non-zero updates for the arithmetic page."""
    model = tiny_qwen3(seed=0)  # the suite's tiny Qwen3 (2 layers, hidden 64, vocab 128)
    ids = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]

    def collate(part):
        return {k: torch.stack([row[k] for row in part]) for k in rows[0]}

    def prompts(n):
        return {"input_ids": ids[:n, :6], "attention_mask": torch.ones_like(ids[:n, :6])}

    cfg = lf.LoRAConfig(r=8, alpha=16)
    adapters = []
    for seed in range(4):
        adapter = lf.init(model, cfg, seed=seed)
        with torch.no_grad():
            for _, leaf, tensor in adapter.leaves():
                if leaf == "B":
                    tensor.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))
        adapters.append(adapter)
    return {
        "__name__": "docs",
        "torch": torch,
        "lf": lf,
        "model": model,
        "rows": rows,
        "cfg": cfg,
        "batch": collate(rows[:4]),
        "loader": [collate(rows[:4]), collate(rows[4:8])],
        "prompt": prompts(1),
        "four_prompts": prompts(4),
        "params": lf.init(model, cfg, seed=0),
        "math_adapter": adapters[0],
        "code_adapter": adapters[1],
        "base_adapter": adapters[2],
        "toxic_adapter": adapters[3],
    }


def test_every_page_has_its_blocks_and_only_the_listed_ones_are_not_run():
    assert "docs/guides/training.md" in PAGES and len(PAGES) > 10
    assert {page: n for page in PAGES if (n := sum(b.not_run is not None for b in blocks(page)))} == NOT_RUN
    names = [b.name for page in PAGES for b in blocks(page) if b.name]
    assert len(names) == len(set(names)) and CHECKED | {"setup"} <= set(names)


def test_the_api_reference_shows_every_public_name():
    """docs/api.md renders each name `import lora_func as lf` exports (a new method's config included)."""
    import inspect

    public = {name for name in dir(lf) if not name.startswith("_") and not inspect.ismodule(getattr(lf, name))}
    shown = set(re.findall(r"^::: lora_func\.(\w+)$", (ROOT / "docs" / "api.md").read_text(), re.M))
    assert public - shown == set(), "missing from docs/api.md"
    assert shown - public == set(), "not public"


def test_the_readme_lists_every_registered_method():
    from lora_func.variants import REGISTRY

    table = (ROOT / "README.md").read_text().split("## Methods", 1)[1].split("\n## ", 1)[0]
    missing = [v.config.__name__ for v in REGISTRY.values() if f"`lf.{v.config.__name__}`" not in table]
    assert not missing, "add a row with the paper to the README's table of methods"


# vmap over stacked adapters runs attention through torch's batching fallback, which says so.
@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented")
@pytest.mark.parametrize("page", [p for p in PAGES if any(b.not_run is None for b in blocks(p))])
def test_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = context()
    for block in blocks(page):
        if block.not_run is None and block.name not in CHECKED:
            execute(block, namespace)


def reference(steps_rows: int, lr: float = 1e-3, clip: float | None = None) -> lf.Params:
    """The setup's model and adapter trained by a plain loop: AdamW on batches of `steps_rows` rows in order."""
    setup = run("setup")
    model, rows = setup["model"], setup["rows"]
    params = lf.init(model, setup["cfg"], seed=0)
    optimizer = torch.optim.AdamW(lf.trainable_leaves(params), lr=lr)
    for start in range(0, len(rows), steps_rows):
        batch = {k: torch.stack([r[k] for r in rows[start : start + steps_rows]]) for k in rows[0]}
        lf.apply(model, params, batch).loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(lf.trainable_leaves(params), clip)
        optimizer.step()
        optimizer.zero_grad()
    return params


def assert_adapters_close(a: lf.Params, b: lf.Params, atol: float) -> None:
    assert a.config == b.config and a.targets == b.targets
    for (path, leaf, x), (_, _, y) in zip(a.leaves(), b.leaves()):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=0, atol=atol, msg=f"{path}.{leaf}")


# Trainer's default `dataloader_pin_memory=True` says so on a machine without an accelerator.
@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")
def test_trainer_example(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    namespace = run("setup", "trainer")
    module, model = namespace["module"], namespace["model"]
    stored = load_file("checkpoints/checkpoint-2/model.safetensors")
    assert set(stored) == set(module.state_dict()) and not set(stored) & set(model.state_dict())
    saved = lf.load("adapter.safetensors", model)
    assert_adapters_close(saved, module.params, atol=0)
    assert lf.from_peft("peft-adapter", model).config.r == 8
    start = lf.init(model, namespace["cfg"], seed=0)
    assert max((a - b).abs().max().item() for (_, _, a), (_, _, b) in zip(saved.leaves(), start.leaves())) > 1e-4


def test_accelerate_example_equals_a_plain_loop(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)
    namespace = run("setup", "accelerate")
    trained = lf.load("adapter-accelerate.safetensors", namespace["model"])
    assert_adapters_close(trained, reference(4, clip=1.0), atol=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, port: int, directory: str) -> None:
    os.chdir(directory)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    import torch.distributed as dist

    original = dist.init_process_group
    # The example's own call, with a timeout that suits a loaded CI machine.
    dist.init_process_group = lambda backend: original(backend, timeout=datetime.timedelta(seconds=60))
    run("setup", "ddp")


@pytest.mark.slow
def test_ddp_example_on_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    # spawned, not forked: a fork of a pytest worker can copy a lock another of its threads holds, and the
    # children hang (seen once: both workers past the timeout)
    context = mp.start_processes(
        ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    try:
        expected = reference(4)  # computed while the workers run
        deadline = time.monotonic() + TIMEOUT_S
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"the 2 DDP workers did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    trained = lf.load(tmp_path / "adapter-ddp.safetensors")
    # Each leaf moves by up to 4 × lr = 4e-3; the all-reduce sums in another order than one batch does, and Adam's
    # g / √v magnifies that rounding where a gradient is near zero (measured: 2.6e-6).
    assert_adapters_close(trained, expected, atol=1e-5)
    start = lf.init(run("setup")["model"], expected.config, seed=0)
    assert max((a - b).abs().max().item() for (_, _, a), (_, _, b) in zip(trained.leaves(), start.leaves())) > 2e-3


def test_freeze_example(capsys):
    namespace = run("setup", "freeze")
    assert capsys.readouterr().out.strip() == "7 of 28 leaves train"
    params = namespace["params"]
    assert {leaf for _, leaf, _ in namespace["trainable"].leaves()} == {"B"}
    assert all(".layers.0." not in path for path, _, _ in namespace["trainable"].leaves())
    assert len(namespace["optimizer"].param_groups[0]["params"]) == 7 == len(list(namespace["module"].parameters()))
    assert sum(1 for _ in lf.split(params)[1].leaves()) == 21


def test_cast_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run("setup", "freeze", "cast")
    stored = lf.load("adapter-bf16.safetensors")
    assert stored.config.dtype == torch.bfloat16
    assert {t.dtype for _, _, t in namespace["params"].leaves()} == {torch.float32}
    assert os.path.getsize("adapter-bf16.safetensors") < 0.6 * 4 * namespace["params"].num_params() + 16_384


def test_pad_example_rows_equal_each_adapter_alone():
    namespace = run("setup", "pad")
    model, batch = namespace["model"], namespace["batch"]
    for i, adapter in enumerate(namespace["adapters"]):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        alone = lf.apply(model, adapter, row).logits
        torch.testing.assert_close(namespace["out"].logits[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_per_row_losses_example():
    namespace = run("setup", "per-row-losses")
    model, batch, stacked = namespace["model"], namespace["batch"], namespace["stacked"]
    adapters = lf.unstack(stacked)
    for i, k in enumerate(namespace["ids"].tolist()):
        row = {key: v[i : i + 1] for key, v in batch.items()}
        expected = lf.apply(model, adapters[k], row).loss
        torch.testing.assert_close(namespace["row_losses"][i], expected, rtol=1e-5, atol=1e-6)
    assert all(t.grad is not None for t in lf.trainable_leaves(stacked))
