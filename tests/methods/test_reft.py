"""ReFT (LoReFT, NoReFT, DiReFT) against pyreft's interventions, its position rule, and a hand-written generate.

References: pyreft 0.1.0's `pyreft/interventions.py` (loaded from an installed pyreft by file, since pyreft's
`__init__` imports its trainer and `datasets`; needs pyvene), and, where pyreft is not installed, the formulas of
that file transcribed below. The positions: `get_intervention_locations` of pyreft's `dataset.py`, transcribed
(`pyreft_positions`; that module imports `datasets`).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from components import perturbed, qwen3_batch, tiny_qwen3

import lora_func as lf
from lora_func._config import ConfigError

INTERVENTIONS = ("loreft", "noreft", "direft")


# -- references ----------------------------------------------------------------------------------------------------


@functools.cache
def pyreft_interventions():
    """pyreft's `interventions` module, or None where pyreft (and pyvene) are not installed."""
    spec = importlib.util.find_spec("pyreft")
    if spec is None or importlib.util.find_spec("pyvene") is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "interventions.py"
    module_spec = importlib.util.spec_from_file_location("pyreft_interventions", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def pyreft_module(kind: str, leaves: dict[str, torch.Tensor]) -> torch.nn.Module:
    """pyreft's intervention for `kind`, its parameters set to `leaves` (R: (r, d), W: (r, d), b: (r,))."""
    module = pyreft_interventions()
    if module is None:
        pytest.skip("pyreft and pyvene are not installed (pip install --no-deps pyreft==0.1.0 pyvene==0.1.8)")
    r, d = leaves["R"].shape
    cls = {"loreft": "LoreftIntervention", "noreft": "NoreftIntervention", "direft": "DireftIntervention"}[kind]
    extra = {"add_bias": False} if kind == "noreft" else {}
    iv = getattr(module, cls)(embed_dim=d, low_rank_dimension=r, dtype=torch.float32, **extra)
    with torch.no_grad():
        iv.learned_source.weight.copy_(leaves["W"])
        iv.learned_source.bias.copy_(leaves["b"])
        if kind == "noreft":
            iv.proj_layer.weight.copy_(leaves["R"])
        else:  # through the orthogonal parametrization: R must have orthonormal rows
            iv.rotate_layer.weight = leaves["R"].t().contiguous()
    return iv.eval()


class Transcribed(torch.nn.Module):
    """pyreft's intervention module as its source writes it (`learned_source` a linear layer, R fixed), for where
    pyreft is not installed."""

    def __init__(self, kind: str, leaves: dict[str, torch.Tensor]) -> None:
        super().__init__()
        r, d = leaves["R"].shape
        self.kind = kind
        self.learned_source = torch.nn.Linear(d, r)
        with torch.no_grad():
            self.learned_source.weight.copy_(leaves["W"])
            self.learned_source.bias.copy_(leaves["b"])
        self.register_buffer("R", leaves["R"].detach().clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        W, b = self.learned_source.weight, self.learned_source.bias
        return formula(self.kind, h, {"R": self.R, "W": W, "b": b})


def reference_module(kind: str, leaves: dict[str, torch.Tensor]) -> torch.nn.Module:
    """pyreft's module where pyreft is installed, else its formulas transcribed."""
    if pyreft_interventions() is None:
        return Transcribed(kind, leaves)
    return pyreft_module(kind, leaves)


def formula(kind: str, h: torch.Tensor, leaves: dict[str, torch.Tensor]) -> torch.Tensor:
    """pyreft's forwards, transcribed: LoReFT/NoReFT h + (W h + b − R h) R, DiReFT h + (W h + b) R (rows of R)."""
    R, W, b = leaves["R"], leaves["W"], leaves["b"]
    source = h @ W.t() + b
    if kind != "direft":
        source = source - h @ R.t()
    return h + source @ R


def pyreft_positions(length: int, first: int, last: int) -> list[int]:
    """pyreft's `get_intervention_locations` with `share_weights=True`, without its pad entries (they point at an
    extra pad token pyreft's collator adds): positions within the row's own `length` tokens."""
    first_n, last_n = min(length // 2, first), min(length // 2, last)
    return list(range(first_n)) + list(range(length - last_n, length))


def first_block_output(model, run) -> torch.Tensor:
    """Block 0's output, as block 1 receives it (after any hook on block 0), while `run()` runs."""
    seen = []
    handle = model.model.layers[1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def padded_batch(lengths, total: int, side: str, seed: int = 1):
    """Rows of the given real lengths padded to `total` on `side`, with position ids counted over real tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (len(lengths), total), generator=gen)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, total - n :] = 1
        else:
            mask[i, :n] = 1
    ids = ids * mask  # pad token 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def manual_reft(model, params, kind: str, first: int, last: int, edit_prompt_only: bool = False):
    """Hooks that apply pyreft's intervention to each block's output at pyreft's positions of each row (from the
    attention mask passed here through `state`), pyreft-style: gather, intervene, scatter."""
    state = {"mask": None, "calls": 0}
    modules = {
        t.path: reference_module(kind, {k: v.detach() for k, v in params[t.path].items()}) for t in params.targets
    }

    def hook(layer_path):
        def edit(module, args, out):
            mask = state["mask"]
            if edit_prompt_only and out.shape[1] != mask.shape[1]:
                return out  # a decoding step
            out = out.clone()
            for row in range(out.shape[0]):
                real = mask[row].nonzero().flatten()
                picked = real[pyreft_positions(len(real), first, last)]
                out[row, picked] = modules[layer_path](out[row, picked].unsqueeze(0)).squeeze(0)
            return out

        return edit

    handles = [model.get_submodule(t.path).register_forward_hook(hook(t.path)) for t in params.targets]
    return state, handles, modules


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3().eval()


def adapter(model, kind: str, positions: str = "f3+l3", seed: int = 0, **fields):
    """Perturbed W and b; R kept as init gives it (orthonormal rows for LoReFT and DiReFT)."""
    params = lf.init(model, lf.ReFTConfig(r=4, positions=positions, intervention=kind, **fields), seed=seed)
    moved = perturbed(params, scale=0.3, seed=seed + 1)
    entries = {p: {**dict(moved[p]), "R": params[p]["R"]} for p in params}
    return params.replace(entries)


# -- the interventions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", INTERVENTIONS)
def test_intervention_equals_pyreft_outputs_and_gradients(kind, model):
    """The variant's forward on hidden states equals pyreft's module given the same leaves: outputs, and gradients
    to h, R, W and b (R's through pyreft's parametrized weight) <= 1e-5."""
    from lora_func.variants import REGISTRY

    params = adapter(model, kind)
    path = params.targets[0].path
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params[path].items()}
    h = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    site = lf._sites.resolve_sites(model, params, "test")[0][1]
    ours = REGISTRY["reft"].forward(None, h, leaves, site)
    probe = torch.randn(ours.shape, generator=torch.Generator().manual_seed(5))
    (ours * probe).sum().backward()

    iv = pyreft_module(kind, {k: v.detach() for k, v in leaves.items()})
    h2 = h.detach().clone().requires_grad_()
    if kind == "noreft":
        theirs = iv(h2)
        (theirs * probe).sum().backward()
        grad_R = iv.proj_layer.weight.grad
    else:
        with torch.nn.utils.parametrize.cached():
            weight = iv.rotate_layer.weight  # (d, r), computed once under `cached`
            weight.retain_grad()
            theirs = iv(h2)
            (theirs * probe).sum().backward()
        grad_R = weight.grad.t()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(leaves["R"].grad, grad_R, rtol=0, atol=1e-5)
    torch.testing.assert_close(leaves["W"].grad, iv.learned_source.weight.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(leaves["b"].grad, iv.learned_source.bias.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", INTERVENTIONS)
def test_intervention_equals_transcribed_formula(kind, model):
    """Without pyreft: the forward equals pyreft's formulas, transcribed."""
    from lora_func.variants import REGISTRY

    params = adapter(model, kind)
    path = params.targets[0].path
    leaves = {k: v.detach() for k, v in params[path].items()}
    h = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(4))
    site = lf._sites.resolve_sites(model, params, "test")[0][1]
    got = REGISTRY["reft"].forward(None, h, leaves, site)
    torch.testing.assert_close(got, formula(kind, h, leaves), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", INTERVENTIONS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_model_equals_pyreft_at_its_positions(kind, side, model):
    """The whole model with the adapter equals the base model with pyreft's intervention (its transcribed formula
    where pyreft is absent) applied by hand at pyreft's positions of each row (rows of 2 to 9 real tokens: the caps
    at half a short row), logits and leaf gradients."""
    params = adapter(model, kind, positions="f3+l2")
    batch = padded_batch([9, 2, 5, 3], 10, side)
    real = batch["attention_mask"].bool()
    out = lf.apply(model, params, batch).logits
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    ours = torch.autograd.grad(((out * probe)[real]).sum(), [params[p][k] for p in params for k in ("W", "b")])

    state, handles, modules = manual_reft(model, params, kind, 3, 2)
    state["mask"] = batch["attention_mask"]
    try:
        expected = model(**batch).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out[real], expected[real], rtol=0, atol=1e-5)
    with torch.no_grad():
        assert (out - model(**batch).logits)[real].abs().max() > 1e-2  # the adapter acts
    ((expected * probe)[real]).sum().backward()
    theirs = [g for p in params for g in (modules[p].learned_source.weight.grad, modules[p].learned_source.bias.grad)]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_positions_follow_pyreft_under_left_and_right_padding(model):
    """Layer 0's output moves exactly at pyreft's positions of each row's real tokens, left or right padded, and
    `attention_mask` given positionally or not at all (every token real)."""
    params = adapter(model, "loreft", positions="f3+l2")
    for side in ("left", "right"):
        batch = padded_batch([9, 1, 2, 4, 7], 10, side)
        plain = first_block_output(model, lambda batch=batch: model(**batch))
        with torch.no_grad():
            edited = first_block_output(model, lambda batch=batch: lf.apply(model, params, batch))
        moved = (edited - plain).abs().amax(-1) > 0
        expected = torch.zeros_like(moved)
        for row, mask in enumerate(batch["attention_mask"]):
            real = mask.nonzero().flatten()
            expected[row, real[pyreft_positions(len(real), 3, 2)]] = True
        assert torch.equal(moved, expected), (side, moved.int())
    ids = qwen3_batch(batch=2, seq=8)["input_ids"]
    plain = first_block_output(model, lambda: model(ids))
    with torch.no_grad():
        edited = first_block_output(model, lambda: lf.apply(model, params, (ids, torch.ones_like(ids))))
        alone = first_block_output(model, lambda: lf.apply(model, params, ids))
    assert torch.equal(edited, alone)
    assert ((edited - plain).abs().amax(-1) > 0).sum(1).tolist() == [5, 5]


def test_training_rows_count_their_prompt_as_pyreft_does(model):
    """A supervised row (prompt labelled -100, then its answer, right-padded): the edits fall on the prompt's first
    and last tokens (pyreft's `last_position = len(prompt)`), so block 0's output on the prompt is what the prompt
    alone (generate's prefill) gets; a row labelled everywhere (plain language modelling) counts all its tokens."""
    params = adapter(model, "loreft", positions="f2+l3")
    batch = padded_batch([10, 8], 10, "right")
    prompt_lengths = [7, 6]
    labels = batch["input_ids"].clone()
    for row, n in enumerate(prompt_lengths):
        labels[row, :n] = -100
    labels[batch["attention_mask"] == 0] = -100
    lm_row = batch["input_ids"][1:].clone()
    batch = {**batch, "labels": labels}
    plain = first_block_output(model, lambda: model(**batch))
    with torch.no_grad():
        edited = first_block_output(model, lambda: lf.apply(model, params, batch))
    moved = ((edited - plain).abs().amax(-1) > 0).int().tolist()
    assert moved == [[1, 1, 0, 0, 1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 1, 1, 0, 0, 0, 0]]
    for row, n in enumerate(prompt_lengths):
        alone = {"input_ids": batch["input_ids"][row : row + 1, :n]}
        with torch.no_grad():
            prefill = first_block_output(model, lambda alone=alone: lf.apply(model, params, alone))
        torch.testing.assert_close(edited[row, :n], prefill[0], rtol=0, atol=1e-5)
    lm = {"input_ids": lm_row, "attention_mask": batch["attention_mask"][1:], "labels": lm_row}
    with torch.no_grad():
        lm_moved = first_block_output(model, lambda: lf.apply(model, params, lm)) - first_block_output(
            model, lambda: model(**lm)
        )
    assert (lm_moved.abs().amax(-1) > 0).int().tolist() == [[1, 1, 0, 0, 0, 1, 1, 1, 0, 0]]


def test_padding_side_does_not_change_the_result(model):
    """The same rows padded left or right give the same logits at their real tokens (the positions follow them)."""
    params = adapter(model, "loreft")
    lengths = [9, 4, 2]
    left, right = padded_batch(lengths, 10, "left"), padded_batch(lengths, 10, "right")
    right["input_ids"] = torch.zeros_like(left["input_ids"])
    for row, n in enumerate(lengths):
        right["input_ids"][row, :n] = left["input_ids"][row, 10 - n :]
    with torch.no_grad():
        a = lf.apply(model, params, left).logits[left["attention_mask"].bool()]
        b = lf.apply(model, params, right).logits[right["attention_mask"].bool()]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_generate_edits_the_prompt_only(model):
    """Greedy `generate` inside `lf.inject` equals generate with pyreft's intervention hooked by hand on the prompt's
    call only (left-padded prompts), scores <= 1e-5; editing every call as well would change them."""
    params = adapter(model, "loreft")
    prompt = padded_batch([6, 3], 6, "left")
    del prompt["position_ids"]  # generate derives them from the mask
    kwargs = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad(), lf.inject(model, params):
        ours = model.generate(**prompt, **kwargs)
    state, handles, _ = manual_reft(model, params, "loreft", 3, 3, edit_prompt_only=True)
    state["mask"] = prompt["attention_mask"]
    try:
        with torch.no_grad():
            theirs = model.generate(**prompt, **kwargs)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.scores, theirs.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with torch.no_grad():
        base = model.generate(**prompt, **kwargs)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(ours.scores, base.scores))


# -- training: R stays orthonormal --------------------------------------------------------------------------------


def _orthonormality_error(params) -> float:
    return max((params[p]["R"] @ params[p]["R"].t() - torch.eye(4)).abs().max().item() for p in params)


@pytest.mark.parametrize("kind", ["loreft", "direft"])
def test_schedule_keeps_R_orthonormal_in_a_torch_optim_loop(kind, model):
    """After 10 AdamW steps each followed by lf.schedule, R Rᵀ = I to 1e-5 (without it R drifts), and the loss fell."""
    batch = {**qwen3_batch(batch=2), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    drift = None
    for use_schedule in (False, True):
        params = lf.init(model, lf.ReFTConfig(r=4, intervention=kind), seed=0)
        optimizer = torch.optim.AdamW(lf.trainable_leaves(params), lr=1e-2)
        state = lf.schedule_state(params)
        losses = []
        for step in range(10):
            loss = lf.apply(model, params, batch).loss
            loss.backward()
            optimizer.step()
            if use_schedule:
                params, state = lf.schedule(params, state, step)
            optimizer.zero_grad()
            losses.append(loss.item())
        if not use_schedule:
            drift = _orthonormality_error(params)
    assert drift > 1e-3
    assert _orthonormality_error(params) < 1e-5
    assert losses[-1] < losses[0]


def test_schedule_keeps_R_orthonormal_in_the_torch_func_style(model):
    """torch.func.grad over the trainable half, an SGD step, then lf.schedule with `grads=`."""
    batch = {**qwen3_batch(batch=2), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    params = lf.init(model, lf.ReFTConfig(r=4), seed=0)
    trainable, frozen = lf.split(params)
    state = lf.schedule_state(params)

    def loss(t):
        return lf.apply(model, lf.combine(t, frozen), batch).loss

    for step in range(5):
        grads = torch.func.grad(loss)(trainable)
        trainable = trainable.replace(
            {p: {k: (v - 0.05 * grads[p][k]).detach() for k, v in e.items()} for p, e in trainable.items()}
        )
        params, state = lf.schedule(lf.combine(trainable, frozen), state, step, grads=grads)
        trainable, frozen = lf.split(params)
    assert _orthonormality_error(params) < 1e-5


def test_noreft_R_is_not_retracted(model):
    params = adapter(model, "noreft")
    before = {p: params[p]["R"].detach().clone() for p in params}
    out, _ = lf.schedule(params, lf.schedule_state(params), 0)
    assert all(torch.equal(out[p]["R"], before[p]) for p in params)


def test_init_is_pyreft_shaped(model):
    """R with orthonormal rows (LoReFT, DiReFT), W and b in nn.Linear's init range, seeded."""
    params = lf.init(model, lf.ReFTConfig(r=4), seed=0)
    assert _orthonormality_error(params) < 1e-5
    bound = 1 / math.sqrt(64)
    for p in params:
        assert params[p]["b"].abs().max() <= bound and params[p]["W"].abs().max() <= bound
    again = lf.init(model, lf.ReFTConfig(r=4), seed=0)
    assert all(torch.equal(again[p][k], params[p][k]) for p in params for k in params[p])


# -- selection and refusals ----------------------------------------------------------------------------------------


def test_targets_are_the_blocks_counted_by_layers(model):
    assert [t.path for t in lf.targets(model, lf.ReFTConfig(r=4))] == ["model.layers.0", "model.layers.1"]
    assert [t.path for t in lf.targets(model, lf.ReFTConfig(r=4, layers=(1,)))] == ["model.layers.1"]
    # blocks are ReFT's alone: LoRA named by a block's index still adapts the linear layers inside it
    lora = lf.targets(model, lf.LoRAConfig(r=4, target_names=(r"layers\.0",)))
    assert lora and all(t.kind == "linear" and t.path.startswith("model.layers.0.") for t in lora)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"positions": "f3+x3"}, "field `positions`"),
        ({"positions": "f0+l0"}, "selects no position"),
        ({"intervention": "lobireft"}, "field `intervention` must be one of"),
    ],
)
def test_bad_config_is_refused_by_field(fields, match):
    with pytest.raises(ConfigError, match=match):
        lf.ReFTConfig(r=4, **fields)


def test_merge_and_weight_arithmetic_are_refused_by_name(model):
    params = adapter(model, "loreft")
    with pytest.raises(ValueError, match=r"model.layers.0.*no weight change expresses"):
        lf.merge(model, params)
    with pytest.raises(ValueError, match=r"model.layers.0"):
        lf.delta_weights(model, params)
    with pytest.raises(ValueError, match=r"exceeds the hidden size 64"):
        lf.init(model, lf.ReFTConfig(r=65))


# -- positions through the rest of the library: stacks, threads, checkpointing ----------------------------------


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented")
def test_vmap_and_mixed_batches_keep_each_rows_positions(model):
    """Two adapters on a padded batch: vmapped over the stack, and mixed per row (`adapter_ids`, a base row too),
    each row equals that row run alone with its own adapter (its positions from its own mask)."""
    adapters = [adapter(model, "loreft", seed=0), adapter(model, "loreft", seed=1)]
    batch = padded_batch([9, 3, 6], 10, "left")
    with torch.no_grad():
        alone = [lf.apply(model, p, batch).logits for p in adapters]
        base = model(**batch).logits
        vmapped = torch.func.vmap(lambda p: lf.apply(model, p, batch).logits)(lf.stack(adapters))
        mixed = lf.apply(model, lf.stack(adapters), batch, adapter_ids=[1, -1, 0]).logits
    real = batch["attention_mask"].bool()
    for k in range(2):
        torch.testing.assert_close(vmapped[k][real], alone[k][real], rtol=0, atol=1e-5)
    for row, k in enumerate([1, -1, 0]):
        expected = base[row] if k < 0 else alone[k][row]
        torch.testing.assert_close(mixed[row][real[row]], expected[real[row]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_recomputes_each_call_with_its_own_mask(reentrant):
    """Two forwards with different padding in one `lf.inject` block, their losses summed into one backward, with HF
    gradient checkpointing; and a checkpoint around the whole call, recomputed in backward: the gradients of the run
    without checkpointing."""
    model = tiny_qwen3()
    params = adapter(model, "loreft")
    batches = [padded_batch([9, 4], 10, "left", seed=1), padded_batch([3, 10], 10, "right", seed=2)]
    for b in batches:
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)

    def grads():
        with lf.inject(model, params):
            loss = sum(model(**b).loss for b in batches)
        loss.backward()  # reentrant checkpointing refuses torch.autograd.grad
        out = [t.grad.clone() for t in lf.trainable_leaves(params)]
        for t in lf.trainable_leaves(params):
            t.grad = None
        return out

    expected = grads()

    def whole(*leaves):  # the whole apply checkpointed: recomputed in backward, root call included
        return sum(lf.apply(model, params, b).loss for b in batches)

    leaves = lf.trainable_leaves(params)
    torch.utils.checkpoint.checkpoint(whole, *leaves, use_reentrant=reentrant).backward()
    for t, b in zip(leaves, expected):
        torch.testing.assert_close(t.grad, b, rtol=1e-5, atol=1e-6)
        t.grad = None

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    got = grads()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_threads_each_edit_their_own_rows(model):
    """Four threads, each with its own padded batch and adapter, at the same time: each gets its lone result."""
    import threading

    adapters = [adapter(model, "loreft", seed=k) for k in range(4)]
    batches = [padded_batch([10 - k, 3 + k], 10, "left" if k % 2 else "right", seed=k) for k in range(4)]
    with torch.no_grad():
        expected = [lf.apply(model, p, b).logits for p, b in zip(adapters, batches)]
    results: dict[int, torch.Tensor] = {}
    start = threading.Barrier(4)

    def work(k):
        start.wait()
        with torch.no_grad():
            for _ in range(5):
                results[k] = lf.apply(model, adapters[k], batches[k]).logits

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        assert torch.equal(results[k], expected[k]), k
