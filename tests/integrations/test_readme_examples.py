"""The README's examples of training frameworks and fine-tuning tools, run as written (extracted from README.md, so
the docs cannot rot): HF Trainer, accelerate, and DDP on 2 gloo processes, each ending with the adapter a plain
loop trains; freeze, cast, stacking different ranks, per-row losses."""

from __future__ import annotations

import datetime
import os
import re
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import lora_func as lf

pytest.importorskip("transformers")
README = Path(__file__).resolve().parents[2] / "README.md"
TIMEOUT_S = 120


def example(name: str) -> str:
    """The python block after `<!-- example: NAME -->` in README.md."""
    found = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert found, f"README.md has no example {name!r}"
    return found.group(1)


def run(*names: str) -> dict:
    namespace: dict = {"__name__": "readme"}
    for name in names:
        exec(compile(example(name), f"README.md:{name}", "exec"), namespace)
    return namespace


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


def test_ddp_example_on_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    context = mp.start_processes(
        ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False, start_method="fork"
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
