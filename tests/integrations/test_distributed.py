"""Data-parallel training with `lf.all_reduce_grads`: 2 gloo processes on CPU equal one process on the global batch."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import qwen3_batch, tiny_qwen3

import lora_func as lf

WORLD = 2
STEPS = 3
TIMEOUT_S = 120  # generous for a loaded CI box; the run itself takes a few seconds


def global_batch() -> dict[str, torch.Tensor]:
    return qwen3_batch(batch=2 * WORLD, seq=12)


def shard(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    rows = batch["input_ids"].shape[0] // WORLD
    return {k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()}


def fresh():
    model = tiny_qwen3()
    return model, lf.init(model, lf.LoRAConfig(r=4, alpha=8), seed=0)


def train_optim(model, params, batch, sync) -> lf.Params:
    """The torch.optim style: backward, then (on each rank) average the gradients, then step.

    SGD with momentum keeps the update linear in the gradient; Adam's g/√v would magnify float-rounding
    differences of near-zero gradients (B = 0 at init) far past a tight tolerance, whatever the sync."""
    optimizer = torch.optim.SGD(lf.trainable_leaves(params), lr=0.1, momentum=0.9)
    for _ in range(STEPS):
        lf.apply(model, params, batch).loss.backward()
        if sync:
            lf.all_reduce_grads(params)
        optimizer.step()
        optimizer.zero_grad()
    return params


def train_func(model, params, batch, sync) -> lf.Params:
    """The torch.func style: gradients as a pytree, averaged, then a plain SGD update."""
    trainable, frozen = lf.split(params)
    trainable = trainable.replace({p: {k: v.detach() for k, v in e.items()} for p, e in trainable.items()})

    def loss(t):
        return lf.apply(model, lf.combine(t, frozen), batch).loss

    for _ in range(STEPS):
        grads = torch.func.grad(loss)(trainable)
        if sync:
            grads = lf.all_reduce_grads(grads)
        trainable = trainable.replace(
            {p: {k: v - 0.05 * grads[p][k] for k, v in e.items()} for p, e in trainable.items()}
        )
    return lf.combine(trainable, frozen)


def worker(rank: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        local = shard(global_batch(), rank)
        for name, train in (("optim", train_optim), ("func", train_func)):
            model, params = fresh()
            lf.save(train(model, params, local, sync=True), os.path.join(out_dir, f"{name}-{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    # spawned, not forked: a fork of a pytest worker can copy a lock another of its threads holds, and the
    # children hang (seen once: both workers past the timeout)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    context = mp.start_processes(
        worker, args=(init_method, str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    try:
        # The single-process references are computed while the workers run.
        references = {}
        for name, train in (("optim", train_optim), ("func", train_func)):
            model, params = fresh()
            references[name] = train(model, params, global_batch(), sync=False)
        deadline = time.monotonic() + TIMEOUT_S
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"the {WORLD} gloo workers did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()

    model, initial = fresh()
    for name, reference in references.items():
        ranks = [lf.load(tmp_path / f"{name}-{r}.safetensors", model) for r in range(WORLD)]
        for (_, _, a), (_, _, b) in zip(ranks[0].leaves(), ranks[1].leaves()):
            assert torch.equal(a, b), "ranks diverged"
        moved = max((a - b).abs().max().item() for (_, _, a), (_, _, b) in zip(reference.leaves(), initial.leaves()))
        assert moved > 1e-3, "training did not move the adapter"
        print(
            name, max((a - b).abs().max().item() for (_, _, a), (_, _, b) in zip(ranks[0].leaves(), reference.leaves()))
        )
        for (path, leaf, a), (_, _, b) in zip(ranks[0].leaves(), reference.leaves()):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6, msg=f"{name}: {path}.{leaf}")


def test_all_reduce_grads_needs_a_process_group():
    _, params = fresh()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        lf.all_reduce_grads(params)


@pytest.mark.slow
def test_fsdp2_sharded_base_gets_no_gradients_and_adapter_gradients_match(tmp_path):
    """FSDP2 (`fully_shard`) holds the base as DTensor parameters: with the base left requiring grad (as a
    loaded HF model has it), `lf.apply` still gives it no gradient (invariant 4), and the adapter gradients
    equal those on the unsharded model. One gloo process: the sharding machinery without a second rank."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model, params = fresh()
        batch = global_batch()
        expected_params = lf.unstack(lf.stack([params]))[0]  # a copy with its own leaves
        lf.apply(model, expected_params, batch).loss.backward()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "DTensor"
        lf.apply(model, params, batch).loss.backward()
        given = [n for n, p in model.named_parameters() if p.grad is not None]
        assert given == [], f"base parameters got gradients: {given[:3]}"
        for path, leaf, t in params.leaves():
            torch.testing.assert_close(t.grad, expected_params[path][leaf].grad, rtol=1e-5, atol=1e-7)
    finally:
        dist.destroy_process_group()
