"""Opacus's `PrivacyEngine` drives an `lf.AdapterModule`, and its accountants count a `private_grads` loop.

The engine runs in `grad_sample_mode="no_op"`: Opacus's hook-based modes ("hooks", "functorch", "ghost") find
per-sample gradients by hooking the modules that own the trainable parameters, and an AdapterModule's parameters
live on holder modules that never run (the adapter acts through hooks on the base model's layers), so those hooks
never fire; "ew" (expanded weights) handles a few torch ops only. In "no_op" mode the per-sample gradients are
the caller's (`lf.per_example_grads`, one pass over the real batch), and Opacus does the rest: clipping, noise,
scaling, accounting.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from components import perturbed, qwen3_batch, tiny_qwen3
from torch.utils.data import DataLoader, TensorDataset

import lora_func as lf

opacus = pytest.importorskip("opacus")
from opacus import PrivacyEngine  # noqa: E402
from opacus.accountants import RDPAccountant  # noqa: E402

C, SIGMA, BATCH, STEPS, LR = 0.5, 0.8, 4, 2, 0.5


def row_losses(ids):
    def loss(out):
        return F.cross_entropy(out.logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    return loss


def data():
    return qwen3_batch(batch=BATCH * STEPS, seed=4)["input_ids"]


def opacus_run(params):
    """PrivacyEngine over an AdapterModule: per-sample gradients from lf.per_example_grads, the rest Opacus's."""
    model = tiny_qwen3()
    module = lf.AdapterModule(model, params)
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(data()), batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Secure RNG turned off": fine for a test
        engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure RNG off, and the optimizer's state
        dp_module, dp_optimizer, dp_loader = engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=SIGMA,
            max_grad_norm=C,
            grad_sample_mode="no_op",
            poisson_sampling=False,
            noise_generator=torch.Generator().manual_seed(0),
        )
    for (ids,) in dp_loader:
        grads = lf.per_example_grads(model, module.params, ids, row_losses(ids))
        for parameter, (_, _, g) in zip(module.parameters(), grads.leaves(), strict=True):
            parameter.grad_sample = g.detach()
        dp_optimizer.step()
        dp_optimizer.zero_grad()
    assert dp_module._module is module
    return module.params, engine.get_epsilon(1e-5)


def private_grads_run(params):
    """The same training with lf.private_grads and a plain optimizer; Opacus's accountant counts the steps."""
    model = tiny_qwen3()
    trainable = lf.trainable_leaves(params)
    optimizer = torch.optim.SGD(trainable, lr=LR)
    accountant = RDPAccountant()
    generator = torch.Generator().manual_seed(0)
    ids_all = data()
    for step in range(STEPS):
        ids = ids_all[step * BATCH : (step + 1) * BATCH]
        grads = lf.private_grads(
            model, params, ids, row_losses(ids), max_grad_norm=C, noise_multiplier=SIGMA, generator=generator
        )
        for leaf, (_, _, g) in zip(trainable, grads.leaves(), strict=True):
            leaf.grad = g
        optimizer.step()
        optimizer.zero_grad()
        accountant.step(noise_multiplier=SIGMA, sample_rate=BATCH / len(ids_all))
    return params, accountant.get_epsilon(1e-5)


@pytest.mark.slow
def test_privacy_engine_drives_an_adapter_module_as_private_grads_does():
    """Same data, same noise generator: the engine's training and the private_grads loop end at the same
    adapter (Opacus draws its noise with the call private_grads makes), and the accountants agree."""
    start = perturbed(lf.init(tiny_qwen3(), lf.LoRAConfig(r=4)))

    def copy():
        return start.replace(
            {p: {k: v.detach().clone().requires_grad_(True) for k, v in e.items()} for p, e in start.items()}
        )

    trained_opacus, eps_opacus = opacus_run(copy())
    trained_ours, eps_ours = private_grads_run(copy())
    moved = 0.0
    for path, leaf, t in trained_ours.leaves():
        torch.testing.assert_close(trained_opacus[path][leaf], t, rtol=1e-5, atol=1e-6, msg=f"{path}.{leaf}")
        moved = max(moved, (t - start[path][leaf]).abs().max().item())
    assert moved > 1e-2  # the steps did move the adapter
    assert eps_opacus == pytest.approx(eps_ours, rel=1e-12)
    assert 0 < eps_ours < float("inf")
