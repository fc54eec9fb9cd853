"""LoRA-GA against PEFT's (`preprocess_loraga` + `init_lora_weights="lora_ga"`) and against dense autograd.

PEFT draws the randomized SVD's test matrix (and "random"'s choice) from torch's global RNG between other draws;
`same_draws` reseeds it before each of those calls, in both libraries, so that they see the same draws.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_untouched, hook_count, qwen3_batch, snapshot, tiny_qwen3
from peft_parity import PROJECTIONS, dequantized_twins, twins

import lora_func as lf
from lora_func._calibration import collect_weight_gradients
from lora_func._targets import find_targets

BATCHES = [qwen3_batch(batch=4, seed=7), qwen3_batch(batch=3, seed=8)]


@pytest.fixture
def same_draws(monkeypatch):
    svd_lowrank, randperm = torch.svd_lowrank, torch.randperm

    def seeded_svd(A, q=6, niter=2, M=None):
        torch.manual_seed(0)
        return svd_lowrank(A, q=q, niter=niter, M=M)

    def seeded_randperm(*args, **kwargs):
        torch.manual_seed(1)
        return randperm(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded_svd)
    monkeypatch.setattr(torch, "randperm", seeded_randperm)


def peft_lora_ga(model, batches=BATCHES, loss=None, *, r=4, alpha=8.0, **fields):
    """PEFT's LoRA-GA on `model`: gradients from one backward per batch, then `get_peft_model`."""
    from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(PROJECTIONS),
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(**fields),
    )

    def train_step():
        for batch in batches:
            (model(**batch).loss if loss is None else loss(model, batch)).backward()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's full backward hooks on layers whose inputs need no grad
        preprocess_loraga(model, config, train_step)
        return get_peft_model(model, config)


def peft_factors(peft_model, path):
    layer = peft_model.get_base_model().get_submodule(path)
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


GRID = [(d, "stable") for d in ("ArBr", "A2rBr", "ArB2r", "random")] + [
    ("ArB2r", s) for s in ("weight_svd", "gd_scale", "unit")
]


@pytest.mark.slow
@pytest.mark.parametrize(("direction", "scale"), GRID)
def test_init_is_peft_lora_ga(direction, scale, same_draws):
    """A, B equal PEFT's, bitwise, and PEFT's residual model computes what lora_func's adapted model does."""
    model, twin = twins(attention_bias=True)
    fields = {"direction": direction, "scale": scale}
    cfg = lf.LoRAGAConfig(r=4, alpha=8.0, **fields)
    params = lf.init(model, cfg, calibration_data=BATCHES, progress=False)
    peft_model = peft_lora_ga(twin, **fields)
    assert len(params.targets) == 14
    for target in params.targets:
        A, B = peft_factors(peft_model, target.path)
        assert torch.equal(params[target.path]["A"], A), target.path
        assert torch.equal(params[target.path]["B"], B), target.path
        assert torch.equal(params[target.path]["A0"], A) and torch.equal(params[target.path]["B0"], B)
    batch = qwen3_batch()
    with torch.no_grad():
        base = model(**batch).logits
        ours = lf.apply(model, params, batch).logits
        torch.testing.assert_close(peft_model(**batch).logits, ours, rtol=0, atol=1e-5)
    assert torch.equal(ours, base)  # exactly the identity: B A − B0 A0 = 0


@pytest.mark.slow
def test_rsLoRA_and_patterns_follow_peft(same_draws):
    model, twin = twins()
    cfg = lf.LoRAGAConfig(r=4, alpha=8.0, use_rslora=True, rank_pattern={"down_proj": 2}, scale="gd_scale")
    params = lf.init(model, cfg, calibration_data=BATCHES, progress=False)
    from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga

    def train_step():
        for batch in BATCHES:
            twin(**batch).loss.backward()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: rsLoRA with patterns cannot use its own conversion (lora_func's can)
        config = LoraConfig(
            r=4,
            lora_alpha=8.0,
            use_rslora=True,
            rank_pattern={"down_proj": 2},
            target_modules=list(PROJECTIONS),
            init_lora_weights="lora_ga",
            lora_ga_config=LoraGAConfig(scale="gd_scale"),
        )
        preprocess_loraga(twin, config, train_step)
        peft_model = get_peft_model(twin, config)
    for target in params.targets:
        A, B = peft_factors(peft_model, target.path)
        assert torch.equal(params[target.path]["A"], A) and torch.equal(params[target.path]["B"], B), target.path


def test_gradient_is_the_mean_of_dense_autograd_gradients():
    """Independent reference: autograd of each batch's loss with respect to the weights, on a copy of the model."""
    model, reference = tiny_qwen3(), tiny_qwen3()
    found = find_targets(model, lf.LoRAGAConfig())
    got = collect_weight_gradients(model, found, BATCHES, progress=False)
    weights = [reference.get_submodule(t.path).weight for t in found]
    total = [torch.zeros_like(w) for w in weights]
    for batch in BATCHES:
        for acc, g in zip(total, torch.autograd.grad(reference(**batch).loss, weights)):
            acc += g
    for target, acc in zip(found, total):
        assert got[target.path].calls == len(BATCHES)
        assert got[target.path].count == sum(b["input_ids"].numel() for b in BATCHES)
        torch.testing.assert_close(got[target.path].mean, acc / len(BATCHES), rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_a_loss_that_calls_the_model_twice_averages_over_calls_as_peft():
    """PEFT divides its accumulated gradient by its backward-hook count, one per call: two forwards a batch count
    twice. The mean gradient equals PEFT's `_peft_loraga_grad`."""
    from peft import LoraConfig, LoraGAConfig, preprocess_loraga

    def loss(model, batch):
        first = model(**batch).logits
        second = model(input_ids=batch["input_ids"].flip(1)).logits
        return (first.square().mean() + second.tanh().mean()) * 100

    model, twin = twins()
    found = find_targets(model, lf.LoRAGAConfig())
    got = collect_weight_gradients(model, found, BATCHES, loss, progress=False)
    config = LoraConfig(target_modules=list(PROJECTIONS), init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preprocess_loraga(twin, config, lambda: [loss(twin, batch).backward() for batch in BATCHES])
    for target in found:
        assert got[target.path].calls == 2 * len(BATCHES)
        expected = twin.get_submodule(target.path)._peft_loraga_grad
        torch.testing.assert_close(got[target.path].mean, expected, rtol=1e-5, atol=1e-7, msg=target.path)


@pytest.mark.slow
def test_training_matches_peft_and_to_peft_is_peft_conversion(same_draws, tmp_path):
    """Three AdamW steps from the same init: same logits, gradients and leaves as PEFT's LoRA-GA. Then `to_peft`
    (a rank-2r LoRA for the original base) equals PEFT's own conversion (`path_initial_model_for_weight_conversion`):
    both load in PEFT on the original model and give lora_func's logits, and `from_peft` reads PEFT's conversion."""
    import peft

    model, twin = twins(attention_bias=True)
    params = lf.init(model, lf.LoRAGAConfig(r=4, alpha=8.0), calibration_data=BATCHES, progress=False)
    peft_model = peft_lora_ga(twin)
    peft_model.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the conversion's initial adapter
    peft_model.save_pretrained(tmp_path / "init")
    peft_model.peft_config["default"].init_lora_weights = "lora_ga"

    ours = torch.optim.AdamW(lf.trainable_leaves(params), lr=1e-2)
    theirs = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    worst = {"logits": 0.0, "grad": 0.0}
    for step in range(3):
        batch = qwen3_batch(seed=20 + step)
        out, ref = lf.apply(model, params, batch), peft_model(**batch)
        worst["logits"] = max(worst["logits"], (out.logits - ref.logits).abs().max().item())
        ours.zero_grad(), theirs.zero_grad()
        out.loss.backward(), ref.loss.backward()
        for target in params.targets:
            A, B = peft_factors(peft_model, target.path)
            for leaf, expected in (("A", A), ("B", B)):
                got = params[target.path][leaf].grad
                torch.testing.assert_close(got, expected.grad, rtol=1e-4, atol=1e-6, msg=f"{target.path}.{leaf}")
                worst["grad"] = max(worst["grad"], (got - expected.grad).abs().max().item())
        ours.step(), theirs.step()
    assert worst["logits"] <= 1e-5, worst
    for target in params.targets:
        A, B = peft_factors(peft_model, target.path)
        torch.testing.assert_close(params[target.path]["A"], A, rtol=0, atol=1e-5)
        torch.testing.assert_close(params[target.path]["B"], B, rtol=0, atol=1e-5)

    model.eval()
    batch = qwen3_batch(batch=3, seed=30)
    with torch.no_grad():
        expected = lf.apply(model, params, batch).logits
    peft_model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    lf.to_peft(params, tmp_path / "ours", model=model)
    for folder in ("ours", "converted"):
        loaded = peft.PeftModel.from_pretrained(twins(attention_bias=True)[1].eval(), tmp_path / folder)
        assert loaded.peft_config["default"].r == 8
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=1e-5, msg=folder)
    back = lf.from_peft(tmp_path / "converted", model)
    assert isinstance(back.config, lf.LoRAConfig) and back.config.r == 8
    with torch.no_grad():
        torch.testing.assert_close(lf.apply(model, back, batch).logits, expected, rtol=0, atol=1e-5)

    # An unconverted LoRA-GA checkpoint is for PEFT's residual model: refused, saying how to convert it.
    peft_model.save_pretrained(tmp_path / "raw")
    with pytest.raises(ValueError, match="LoRA-GA checkpoint.*path_initial_model_for_weight_conversion"):
        lf.from_peft(tmp_path / "raw", model)


@pytest.mark.slow
def test_init_leaves_the_model_untouched():
    """Flags (some frozen), an existing `.grad`, hooks, modes, weights: all as they were, bitwise."""
    model = tiny_qwen3()
    model.model.layers[0].mlp.requires_grad_(False)
    model.model.layers[1].eval()
    existing = torch.full_like(model.lm_head.weight, 0.5)
    model.lm_head.weight.grad = existing
    before = snapshot(model)
    before["grads"] = {}
    modes = {n: m.training for n, m in model.named_modules()}
    lf.init(model, lf.LoRAGAConfig(r=4), calibration_data=BATCHES, progress=False)
    assert model.lm_head.weight.grad is existing and torch.equal(existing, torch.full_like(existing, 0.5))
    model.lm_head.weight.grad = None
    assert_untouched(model, before)
    assert {n: m.training for n, m in model.named_modules()} == modes


@pytest.mark.slow
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_hf_gradient_checkpointing_is_off_for_calibration_and_back_on_after(reentrant):
    """The same gradients with the model's HF gradient checkpointing on (switched off for the calibration passes:
    reentrant checkpointing refuses `torch.autograd.grad`), and the flag as it was afterwards."""
    model, plain = tiny_qwen3(), tiny_qwen3()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    flags = {n: m.__dict__.get("gradient_checkpointing") for n, m in model.named_modules()}
    found = find_targets(model, lf.LoRAGAConfig())
    got = collect_weight_gradients(model, found, BATCHES, progress=False)
    want = collect_weight_gradients(plain, found, BATCHES, progress=False)
    assert {n: m.__dict__.get("gradient_checkpointing") for n, m in model.named_modules()} == flags
    assert model.model.layers[0].gradient_checkpointing
    for target in found:
        assert torch.equal(got[target.path].mean, want[target.path].mean), target.path


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_mid_calibration_leaves_nothing_behind(error):
    model = tiny_qwen3()
    model.model.layers[1].eval()
    before = snapshot(model)
    modes = {n: m.training for n, m in model.named_modules()}
    hooks = hook_count(model)
    seen = []

    def loss(m, batch):
        out = m(**batch).loss
        seen.append(out)
        if len(seen) == 2:  # after the second forward, hooks in place and a graph built
            raise error("stop")
        return out

    with pytest.raises(error):
        lf.init(model, lf.LoRAGAConfig(r=4), calibration_data=BATCHES, calibration_loss=loss, progress=False)
    assert len(seen) == 2
    seen.clear()
    assert hook_count(model) == hooks
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert_untouched(model, before)


@pytest.mark.slow
def test_seed_makes_it_reproducible_without_touching_the_global_rng():
    model = tiny_qwen3()
    cfg = lf.LoRAGAConfig(r=4, direction="random")
    state = torch.random.get_rng_state()
    first = lf.init(model, cfg, calibration_data=BATCHES, seed=3, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = lf.init(model, cfg, calibration_data=BATCHES, seed=3, progress=False)
    for path, leaf, tensor in first.leaves():
        assert torch.equal(second[path][leaf], tensor), (path, leaf)


@pytest.mark.slow
def test_delta_weights_is_the_dense_formula():
    model = tiny_qwen3()
    params = lf.init(model, lf.LoRAGAConfig(r=4, alpha=6.0), calibration_data=BATCHES, progress=False)
    delta = lf.delta_weights(model, params)
    assert all(d.abs().max() == 0 for d in delta.values())  # the identity at init, exactly
    params = params.replace(
        {p: {**e, "A": e["A"] + 0.01, "B": e["B"] * 1.5} for p, e in params.items()}
    )  # off the init
    for key, dw in lf.delta_weights(model, params).items():
        leaves = {k: v.detach() for k, v in params[key.removesuffix(".weight")].items()}
        expected = 6.0 / 4 * (leaves["B"] @ leaves["A"] - leaves["B0"] @ leaves["A0"])
        torch.testing.assert_close(dw, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_4bit_base_uses_the_gradient_of_the_dequantized_weight():
    """PEFT refuses quantized bases; lora_func's gradient is the dequantized weight's: a float twin holding those
    weights gives the same gradient and leaves, and the 4-bit model stays untouched."""
    quantized, plain = dequantized_twins()
    before = snapshot(quantized)
    found = find_targets(quantized, lf.LoRAGAConfig())
    assert {t.module for t in found} == {"Linear4bit"}
    got = collect_weight_gradients(quantized, found, BATCHES, progress=False)
    want = collect_weight_gradients(plain, find_targets(plain, lf.LoRAGAConfig()), BATCHES, progress=False)
    for target in found:
        g, w = got[target.path].mean, want[target.path].mean
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4 * w.abs().max().item(), msg=target.path)
    params = lf.init(quantized, lf.LoRAGAConfig(r=4), calibration_data=BATCHES, seed=0, progress=False)
    assert_untouched(quantized, before)
    batch = qwen3_batch()
    with torch.no_grad():
        assert torch.equal(lf.apply(quantized, params, batch).logits, quantized(**batch).logits)


def test_errors_are_clear():
    model = tiny_qwen3()
    with pytest.raises(ValueError, match="`direction` must be one of"):
        lf.LoRAGAConfig(direction="BrAr")
    with pytest.raises(ValueError, match="`scale` must be one of"):
        lf.LoRAGAConfig(scale="gd")
    with pytest.raises(ValueError, match="`stable_gamma` must be > 0"):
        lf.LoRAGAConfig(stable_gamma=0)
    with pytest.raises(ValueError, match=r"2·`r`=48 exceeds min\(d_in, d_out\)=32"):
        lf.targets(model, lf.LoRAGAConfig(r=24))
    no_labels = [{"input_ids": b["input_ids"]} for b in BATCHES]
    with pytest.raises(ValueError, match="calibration batch 0 gave no scalar loss.*`calibration_loss`"):
        lf.init(model, lf.LoRAGAConfig(r=4), calibration_data=no_labels, progress=False)
    with pytest.raises(TypeError, match="`calibration_loss` must be a function"):
        lf.init(model, lf.LoRAGAConfig(r=4), calibration_data=BATCHES, calibration_loss="loss", progress=False)

    def embedding_loss(m, batch):  # the model runs, but the loss reads the embedding alone
        m(**batch)
        return m.model.embed_tokens(batch["input_ids"]).square().mean()

    with pytest.raises(ValueError, match=r"does not depend on the output of \['model\.layers\.1\.self_attn\.o_proj'\]"):
        lf.init(
            model,
            lf.LoRAGAConfig(r=4, target_names=(r"layers\.1\.self_attn\.o_proj$",)),
            calibration_data=BATCHES,
            calibration_loss=embedding_loss,
            progress=False,
        )
    with pytest.raises(ValueError, match="EVAConfig calibrates on layer inputs: it takes no `calibration_loss`"):
        lf.init(model, lf.EVAConfig(r=4), calibration_data=BATCHES, calibration_loss=lambda m, b: m(**b).loss)
    with pytest.raises(ValueError, match="LoRAConfig takes no `calibration_loss`"):
        lf.init(model, lf.LoRAConfig(r=4), calibration_loss=lambda m, b: m(**b).loss)
