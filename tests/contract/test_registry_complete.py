"""Every registered variant declares what the rest of the library needs, and each declaration holds.

A variant says what it can do in its own file (`Variant.capabilities`); these tests run each declaration
against an independent reference, so a missing or wrong one fails here, naming the variant:
- its weight change: `lf.delta_weights` added to the base weights gives a plain model whose outputs are
  `lf.apply`'s; a variant declaring `LowRank` factors sums exactly (`lf.weighted_sum` of one adapter with
  weight 1 computes what it does), one declaring `Dense` is refused by `weighted_sum`, by name;
- `Padding`: adapters of ranks 4 and 8 stacked with `pad=True` compute what each did alone; without it, refused;
- `PeftExchange`: `to_peft` then `from_peft` gives the same leaves and outputs; without it, `to_peft` refuses;
- `Recipe`: the demo's config for it builds an adapter that trains (the loss falls in a few steps at its lr);
- `ParameterForm`: where it applies, a call of one adapter runs its targets by parameters, and gives the outputs
  and gradients of the output form (a mixed batch of that adapter runs the output form); elsewhere no target of a
  linear or norm kind runs by parameters;
- its kinds are kinds lora_func has (`lora_func/kinds/`).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from components import perturbed, qwen3_batch, target_names_for, tiny_config, tiny_qwen3

import lora_func as lf
from lora_func import demo
from lora_func._sites import resolve_sites
from lora_func._variant import (
    Dense,
    Intervention,
    LowRank,
    Padding,
    ParameterForm,
    PeftExchange,
    Recipe,
    Regularizer,
    Schedule,
)
from lora_func.kinds import KINDS, form_of
from lora_func.variants import REGISTRY

VARIANTS = sorted(REGISTRY)


def make(name, model, seed=0, **fields):
    variant = REGISTRY[name]
    calibration = [qwen3_batch(seed=7)] if variant.calibrated else None
    cfg = tiny_config(variant.name, **{"r": 4, **fields})
    return lf.init(model, cfg, seed=seed, calibration_data=calibration, progress=False)


def logits(model, params, batch):
    with torch.no_grad():
        return lf.apply(model, params, batch).logits


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3().eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_weight_change_is_declared_and_exact(name, model):
    """base + ΔW, run as a plain model, gives lf.apply's outputs; LowRank factors sum exactly, Dense is refused."""
    variant = REGISTRY[name]
    low, dense = variant.capability(LowRank), variant.capability(Dense)
    intervention = variant.capability(Intervention)
    declared = [c for c in (low, dense, intervention) if c is not None]
    assert len(declared) == 1, f"{name} must declare exactly one of LowRank / Dense / Intervention"
    params = perturbed(make(name, model), seed=5)
    batch = qwen3_batch(batch=2)
    if intervention is not None:  # hidden states edited: no ΔW exists, and every weight tool says so by name
        with pytest.raises(ValueError, match=rf"delta_weights: target {params.targets[0].path!r}"):
            lf.delta_weights(model, params)
        with pytest.raises(ValueError, match=rf"weighted_sum: target {params.targets[0].path!r}"):
            lf.weighted_sum([params], [1.0], model=model)
        return
    delta = lf.delta_weights(model, params)
    edited = copy.deepcopy(model)
    state = edited.state_dict()
    with torch.no_grad():
        for key, change in delta.items():
            state[key].add_(change.to(state[key].dtype))
    with torch.no_grad():
        plain = edited(**batch).logits
    torch.testing.assert_close(plain, logits(model, params, batch), rtol=1e-5, atol=1e-5)

    if dense is not None:
        # (on a normalisation layer, refused for its kind first: arithmetic builds LoRAs of linear layers)
        with pytest.raises(ValueError, match=r"not a product of low-rank factors|arithmetic covers nn.Linear-style"):
            lf.weighted_sum([params], [1.0], model=model)
        return
    summed = lf.weighted_sum([params], [1.0], model=model if low.reads_weight else None)
    for key, change in lf.delta_weights(model, summed).items():
        torch.testing.assert_close(change, delta[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", VARIANTS)
def test_padding_is_exact_where_declared(name, model):
    """Ranks 4 and 8 stacked with `pad=True`: each adapter of the stack computes what it did alone."""
    adapters = [
        perturbed(make(name, model, seed=k, r=r, alpha=a), seed=k) for k, (r, a) in enumerate([(4, 3.0), (8, 16.0)])
    ]
    if REGISTRY[name].calibrated and adapters[0].targets != adapters[1].targets:
        pytest.skip("calibration chose other targets for the two ranks")
    if REGISTRY[name].capability(Padding) is None:
        with pytest.raises(ValueError, match=f"variant {name!r} with different ranks cannot be stacked"):
            lf.stack(adapters, pad=True)
        return
    batch = qwen3_batch(batch=2)
    for alone, padded in zip(adapters, lf.unstack(lf.stack(adapters, pad=True))):
        torch.testing.assert_close(logits(model, padded, batch), logits(model, alone, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_form_equals_the_output_form_where_declared(name):
    """A call of one adapter (the parameter form where declared) against the same adapter as row 0 of a stack in a
    mixed batch (always the output form): the same logits and leaf gradients."""
    model = tiny_qwen3().train()
    params = perturbed(make(name, model), seed=1)
    forms = {
        site.target.path: form_of(REGISTRY[name], site.target, site).where
        for _, site in resolve_sites(model, params, "test")
    }
    if REGISTRY[name].capability(ParameterForm) is None:
        assert "parameters" not in forms.values(), forms
        return
    assert "parameters" in forms.values(), f"{name} declares ParameterForm, and it applies to no target here"
    batch = qwen3_batch(batch=2)
    ids = [0] * len(batch["input_ids"])

    def run(adapter, call):
        trainable, frozen = lf.split(adapter)
        leaves = [leaf.detach().requires_grad_() for _, _, leaf in trainable.leaves()]
        out = call(lf.combine(trainable.replace(_entries(trainable, leaves)), frozen))
        out.square().mean().backward()
        return out.detach(), [leaf.grad for leaf in leaves]

    alone, alone_grads = run(params, lambda p: lf.apply(model, p, batch).logits)
    mixed, mixed_grads = run(lf.stack([params]), lambda p: lf.apply(model, p, batch, adapter_ids=ids).logits)
    torch.testing.assert_close(alone, mixed, rtol=1e-5, atol=1e-5)
    assert len(alone_grads) == len(mixed_grads) > 0
    for a, b in zip(alone_grads, mixed_grads):
        torch.testing.assert_close(a, b[0], rtol=1e-4, atol=1e-6)


def _entries(tree, leaves):
    """`tree`'s {path: {leaf: tensor}} with its leaves, in `leaves()` order, replaced by `leaves`."""
    it = iter(leaves)
    return {path: {k: next(it) for k in entry} for path, entry in tree.items()}


@pytest.mark.parametrize("name", VARIANTS)
def test_peft_exchange_round_trips_where_declared(name, model, tmp_path):
    """to_peft then from_peft: the same outputs (PEFT's own outputs: each method's test). Square targets of one
    shape, which every method's PEFT config can express (ROAD's one `group_size`, ...)."""
    exchange = REGISTRY[name].capability(PeftExchange)
    names = target_names_for(REGISTRY[name], (r"(q|o)_proj$",))  # None for ReFT (no PEFT counterpart)
    params = perturbed(make(name, model, **({"target_names": names} if names else {})), seed=5)
    if exchange is None:
        with pytest.raises(ValueError, match=rf"variant {name!r} has no PEFT counterpart"):
            lf.to_peft(params, tmp_path)
        return
    lf.to_peft(params, tmp_path, model=model)
    back = lf.from_peft(tmp_path, model)
    batch = qwen3_batch(batch=2)
    torch.testing.assert_close(logits(model, back, batch), logits(model, params, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_recipe_trains(name, model):
    """The demo trains every variant with its own Recipe: its config builds, and 5 AdamW steps at its lr lower the
    loss of one batch."""
    variant = REGISTRY[name]
    recipe = variant.capability(Recipe)
    assert recipe is not None, f"{name} declares no Recipe (the MiniLM demo and notebook 02 train every variant)"
    assert math.isfinite(recipe.lr) and recipe.lr > 0
    cfg = demo.config_for(variant, recipe)
    calibration = [qwen3_batch(batch=4, seed=7 + i) for i in range(3)] if variant.calibrated else None
    params = lf.init(model, cfg, seed=0, calibration_data=calibration, progress=False)
    optimizer = torch.optim.AdamW(lf.trainable_leaves(params), lr=recipe.lr, weight_decay=0.0)
    batch = {**qwen3_batch(batch=2), "labels": qwen3_batch(batch=2)["input_ids"]}
    losses = []
    state = lf.schedule_state(params)  # the demo's loop: each method's schedule and extra loss
    for step in range(5):
        loss = lf.apply(model, params, batch).loss
        optimizer.zero_grad()
        (loss + lf.regularizer(params)).backward()
        optimizer.step()
        params, state = lf.schedule(params, state, step)
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"{name}: loss {losses} at its Recipe's lr {recipe.lr}"


@pytest.mark.parametrize("name", VARIANTS)
def test_kinds_are_known(name):
    assert set(REGISTRY[name].kinds) <= set(KINDS), f"{name} lists kinds lora_func does not have"


@pytest.mark.parametrize("name", VARIANTS)
def test_schedule_and_regularizer_are_identity_and_zero_where_not_declared(name, model):
    """A training loop written with lf.schedule / lf.regularizer works for every variant: without a `Schedule` the
    step returns its inputs, without a `Regularizer` the extra loss is 0."""
    variant = REGISTRY[name]
    params = make(name, model)
    state = lf.schedule_state(params)
    if variant.capability(Schedule) is None:
        assert state is None
        out, new_state = lf.schedule(params, state, 3)
        assert out is params and new_state is None
    if variant.capability(Regularizer) is None:
        assert torch.equal(lf.regularizer(params), torch.zeros(()))
    with pytest.raises(ValueError, match="`step` must be an int >= 0"):
        lf.schedule(params, state, -1)
