"""lora_func on a CUDA device: `pytest tests/integrations/test_gpu.py --device cuda` (`nox -s gpu` runs it). Every
test is marked `cuda` and skipped without `--device cuda` and a CUDA device (tests/conftest.py).

- The contract on the device: the checks of tests/contract/test_contract.py, for every variant, run as they are
  on the tiny Qwen3 built on the GPU (identity at init, the model untouched, gradients on trainable leaves only
  and torch.func.grad = autograd, save -> load bitwise, merge = apply, gradient checkpointing, the AdamW probe);
  and the leaves live where the model does.
- What only a GPU computes differently, against independent references:
  - autocast on CUDA, bf16 and fp16 with a GradScaler: within the dtype's precision of the dense merge run
    through `functional_call` under the same autocast (no adapter path of lora_func's);
  - bitsandbytes layers quantized on CUDA (nf4 `Linear4bit`, `Linear8bitLt` with int8 activations): LoRA and
    DoRA against a float model holding the weights bitsandbytes' own dequantization gives, and identity at init
    and finite gradients for every variant;
  - FSDP2 over NCCL (one rank): the adapter gradients on the sharded base equal those on the unsharded one;
  - K adapters in one pass (`vmap(grad)` over `lf.stack`, `adapter_ids` on a repeated batch) equal a loop, with
    CUDA's SDPA kernels in bf16; a mixed batch (`adapter_ids`) equals PEFT's `adapter_names`;
  - torch.compile with inductor's Triton kernels: one graph, the eager loss and gradients, for two adapters in
    turn; CUDA graphs (`mode="reduce-overhead"`) follow new adapter values instead of replaying stale ones;
  - memory: a training step on a base that requires grad allocates no base gradient and peaks no higher than
    PEFT's step (the CUDA allocator's peak).
Timing is `benchmarks/bench_gpu.py`'s.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
from components import tiny_config
from conftest import NOT_IDENTITY_AT_INIT, assert_untouched, perturbed, qwen3_batch, qwen3_subject, snapshot, tiny_qwen3

import lora_func as lf
from lora_func._variant import Intervention
from lora_func.variants import REGISTRY

# Inductor says once that TF32 is off (the fp32 checks here turn it off on purpose), and imports a module that
# uses the deprecated `torch.jit.script_method`.
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # lora_func's defaults

VARIANTS = sorted(REGISTRY)
# The variants with a weight form, whose dense merge is the autocast reference (ReFT's autocast: tests/integrations/
# test_autocast.py, against hooks applying its formula).
WEIGHT_FORM = [n for n in VARIANTS if REGISTRY[n].capability(Intervention) is None]
TESTS = Path(__file__).resolve().parents[1]


def _test_module(relative: str):
    """A module of the test suite, imported once under its own name (as pytest imports it)."""
    path = TESTS / relative
    name = path.stem
    module = sys.modules.get(name)
    if module is not None and Path(module.__file__).resolve() == path:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# The contract's own checks, run on the device as they are written (resolved here, so that a renamed check fails
# collection on any machine rather than only on a GPU).
_contract = _test_module("contract/test_contract.py")
CONTRACT_CHECKS = {
    "untouched_and_identity": lambda name, subject, tmp: _contract.test_untouched_and_identity(name, subject),
    "no_hooks_left": lambda name, subject, tmp: _contract.test_no_hooks_left_when_output_is_dropped(name, subject),
    "gradients_trainable_only": lambda name, subject, tmp: _contract.test_gradients_reach_trainable_leaves_only(
        name, subject
    ),
    "save_load_bitwise": lambda name, subject, tmp: _contract.test_save_load_is_bitwise(name, subject, tmp),
    "merge_equals_apply": lambda name, subject, tmp: _contract.test_merge_equals_apply(name, subject),
    "checkpointing": lambda name, subject, tmp: _contract.test_gradient_checkpointing_gives_same_gradients(
        name, subject, False
    ),
    "adamw_probe": lambda name, subject, tmp: _contract.test_adamw_probe_lowers_loss(name, subject),
}


@pytest.fixture(autouse=True)
def exact_float32():
    """fp32 references compare at fp32: no TF32 matmuls while a test runs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on(device: torch.device, batch: dict) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def make(name: str, model, batch, seed: int = 0) -> lf.Params:
    kwargs = {"calibration_data": [batch], "progress": False} if REGISTRY[name].calibrated else {}
    return lf.init(model, tiny_config(name, r=4), seed=seed, **kwargs)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().float().flatten() for t in tensors])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def leaf_grads(params: lf.Params) -> dict[str, torch.Tensor]:
    return {f"{p}.{k}": t.grad for p, k, t in lf.split(params)[0].leaves()}


# -- the contract on the device ------------------------------------------------------------------------------------


@pytest.mark.parametrize("check", sorted(CONTRACT_CHECKS))
@pytest.mark.parametrize("name", VARIANTS)
def test_contract_on_the_device(name, check, device, tmp_path):
    subject = qwen3_subject(device)
    assert subject.batch["input_ids"].device.type == device.type
    CONTRACT_CHECKS[check](name, subject, tmp_path)


@pytest.mark.parametrize("name", VARIANTS)
def test_leaves_live_where_the_model_does(name, device, tmp_path):
    """init, perturbation, load, merge and apply keep every tensor on the model's device."""
    model = tiny_qwen3().to(device)
    batch = on(device, qwen3_batch())
    params = perturbed(make(name, model, batch))
    assert all(t.device.type == device.type for _, _, t in params.leaves())
    lf.save(params, tmp_path / "adapter.safetensors")
    loaded = lf.load(tmp_path / "adapter.safetensors", model)
    assert all(loaded[p][k].device == t.device for p, k, t in params.leaves())
    if REGISTRY[name].capability(Intervention) is None:  # ReFT has no weight form
        assert all(w.device.type == device.type for w in lf.merge(model, params).values())
    assert lf.apply(model, loaded, batch).logits.device.type == device.type


# -- autocast on CUDA ----------------------------------------------------------------------------------------------

FLOOR = {torch.bfloat16: 4e-3, torch.float16: 5e-4}  # about one rounding of the dtype, relative


def dense_reference(model, params, batch, leaves, dtype=None):
    """Logits and leaf gradients of `functional_call(model, lf.merge(...))`, under CUDA autocast to `dtype` if given."""
    merged = lf.merge(model, params)  # outside autocast: float32 weights, differentiable in the leaves
    with torch.autocast(model.lm_head.weight.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = torch.func.functional_call(model, merged, (), batch)
    return out.logits.float(), flat(torch.autograd.grad(out.loss, leaves))


def assert_within_precision(name, dtype, logits, grads, model, params, batch, leaves):
    """As close to the float32 dense reference as that reference under the same autocast is (twice its error, plus
    a floor of the dtype's rounding), in output and in every leaf's gradient."""
    ref_logits, ref_grads = dense_reference(model, params, batch, leaves)
    low_logits, low_grads = dense_reference(model, params, batch, leaves, dtype)
    with torch.no_grad():
        base = model(**batch).logits
    assert relative(ref_logits, base) > 20 * FLOOR[dtype]  # the adapter moves the output more than the precision lost
    for what, got, low, ref in (("logits", logits, low_logits, ref_logits), ("gradients", grads, low_grads, ref_grads)):
        bound = 2 * relative(low, ref) + FLOOR[dtype]
        error = relative(got, ref)
        assert error <= bound, f"{name} under CUDA {dtype} autocast: {what} off the float32 reference by {error:.4f}"


def autocast_setup(name, device):
    model = tiny_qwen3(num_hidden_layers=1).to(device)
    batch = on(device, qwen3_batch())
    params = perturbed(make(name, model, batch), scale=0.1)
    return model, batch, params, [t for _, _, t in lf.split(params)[0].leaves()]


@pytest.mark.parametrize("name", WEIGHT_FORM)
def test_bf16_autocast_on_cuda_trains_as_the_dense_reference(name, device):
    model, batch, params, leaves = autocast_setup(name, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = lf.apply(model, params, batch)
    assert out.logits.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.loss, leaves)
    assert all(g.dtype == torch.float32 for g in grads)  # float32 leaves keep float32 gradients
    assert_within_precision(name, torch.bfloat16, out.logits, flat(grads), model, params, batch, leaves)


@pytest.mark.parametrize("name", WEIGHT_FORM)
def test_fp16_autocast_on_cuda_with_grad_scaler(name, device):
    """The torch AMP recipe: scaled backward, unscale, step, update; the step is taken (no inf or NaN) and the
    unscaled gradients match the dense reference within fp16 precision."""
    model, batch, params, leaves = autocast_setup(name, device)
    before = [t.detach().clone() for t in leaves]
    optimizer = torch.optim.SGD(leaves, lr=1e-2)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    with torch.autocast(device.type, dtype=torch.float16):
        out = lf.apply(model, params, batch)
    scaler.scale(out.loss).backward()
    scaler.unscale_(optimizer)
    grads = flat(t.grad for t in leaves)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**10  # not halved: no inf or NaN gradient
    for value, t in zip(before, leaves):
        torch.testing.assert_close(t.detach(), value - 1e-2 * t.grad)
    for t, value in zip(leaves, before):  # the reference at the values the gradients were taken at
        t.data.copy_(value)
    assert_within_precision(name, torch.float16, out.logits, grads, model, params, batch, leaves)


# -- bitsandbytes on CUDA ------------------------------------------------------------------------------------------

BNB_SHAPE = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_attention_heads=4, head_dim=32)
# Relative errors (‖a − b‖/‖b‖) against the float model holding bitsandbytes' dequantized weights. nf4 with an
# fp32 compute dtype computes x·deq(W)ᵀ in fp32: tight. LLM.int8 also quantizes the activations row-wise to int8
# (and runs in fp16) on CUDA, so its outputs and gradients are only close to the float model's.
BNB_TOL = {4: {"logits": 1e-3, "grads": 1e-2, "func": 1e-4}, 8: {"logits": 5e-2, "grads": 1.5e-1, "func": 1e-3}}


def quantized_on_cuda(bits: int, device) -> torch.nn.Module:
    from components import quantize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = quantize(tiny_qwen3(**BNB_SHAPE), bits, device)
        with torch.no_grad():
            model(**on(device, qwen3_batch(vocab=BNB_SHAPE["vocab_size"])))  # 8-bit: CB/SCB settle on a first call
    return model


def bnb_dequantized(module) -> torch.Tensor:
    """The float weight bitsandbytes' own dequantization gives for a quantized layer."""
    import bitsandbytes as bnb

    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scale = getattr(weight, "SCB", None)
    if scale is None:
        scale = module.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scale).float()


def float_twin(quantized, device) -> torch.nn.Module:
    import bitsandbytes as bnb

    twin = tiny_qwen3(**BNB_SHAPE).to(device)
    layers = [(n, m) for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)]
    assert len(layers) == 7 * twin.config.num_hidden_layers
    with torch.no_grad():
        for name, module in layers:
            twin.get_submodule(name).weight.copy_(bnb_dequantized(module).reshape(module.out_features, -1))
    return twin


def at_init(name: str, bits: int, device):
    """A quantized tiny Qwen3 on `device`, its batch, its snapshot, the variant's adapter at init, and how far
    (relative) the adapted output at init is from the base's."""
    model = quantized_on_cuda(bits, device)
    batch = on(device, qwen3_batch(vocab=BNB_SHAPE["vocab_size"]))
    with torch.no_grad():
        base = model(**batch).logits
    before = snapshot(model)
    params = make(name, model, batch)
    with torch.no_grad():
        identity = relative(lf.apply(model, params, batch).logits, base)
    return model, batch, before, params, identity


def copied(params: lf.Params) -> lf.Params:
    return params.replace(
        {p: {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in e.items()} for p, e in params.items()}
    )


@pytest.mark.filterwarnings("ignore::UserWarning:bitsandbytes")  # its notes on casts and kernels
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", ["lora", "dora"])
def test_bnb_base_on_cuda_matches_its_dequantized_float_model(name, bits, device):
    model, batch, before, params, identity = at_init(name, bits, device)
    assert identity <= 1e-6, f"{bits}-bit {name}: {identity:.2e} off the base at init"  # B = 0: the base's output
    twin = float_twin(model, device)
    params = perturbed(params)
    twin_params = copied(params)

    adapted = lf.apply(model, params, batch)
    adapted.loss.backward()
    reference = lf.apply(twin, twin_params, batch)
    reference.loss.backward()
    assert_untouched(model, before)
    tol = BNB_TOL[bits]
    assert relative(adapted.logits, reference.logits) <= tol["logits"]
    grads, twin_grads = leaf_grads(params), leaf_grads(twin_params)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    worst = max(relative(grads[k], twin_grads[k]) for k in grads)
    assert worst <= tol["grads"], f"{bits}-bit {name}: gradients off the float model's by {worst:.4f}"

    trainable, frozen = lf.split(params)
    func = torch.func.grad(lambda t: lf.apply(model, lf.combine(t, frozen), batch).loss)(trainable)
    worst = max(relative(func[p][k], grads[f"{p}.{k}"]) for p, k, _ in trainable.leaves())
    assert worst <= tol["func"], f"{bits}-bit {name}: torch.func.grad off autograd by {worst:.2e}"
    assert_untouched(model, before)


@pytest.mark.filterwarnings("ignore::UserWarning:bitsandbytes")  # its notes on casts and kernels
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_on_a_bnb_base_on_cuda(name, bits, device):
    """Identity at init (up to the 8-bit kernel's own rounding where a variant computes with the dequantized
    weight), finite gradients on every trainable leaf, the model untouched."""
    model, batch, before, params, identity = at_init(name, bits, device)
    if name not in NOT_IDENTITY_AT_INIT:
        assert identity <= (1e-5 if bits == 4 else 2e-2), f"{bits}-bit {name}: {identity:.2e} off the base at init"
    params = perturbed(params)
    lf.apply(model, params, batch).loss.backward()
    bad = [k for k, g in leaf_grads(params).items() if g is None or not torch.isfinite(g).all()]
    assert not bad, f"{bits}-bit {name}: no finite gradient on {bad[:5]}"
    assert_untouched(model, before)


# -- FSDP2 over NCCL -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base_frozen", [True, False], ids=["base frozen", "base requires grad"])
def test_fsdp2_on_nccl_gives_the_unsharded_gradients(base_frozen, device, tmp_path):
    """One NCCL rank, every decoder layer and the root `fully_shard`ed: the adapter gradients equal the unsharded
    model's and no base parameter gets a gradient; on the frozen base, torch.func.grad gives the same."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        shape = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, head_dim=32, num_hidden_layers=3)
        model = tiny_qwen3(**shape).to(device).requires_grad_(not base_frozen)
        batch = on(device, qwen3_batch(batch=4, seq=16))
        reference = copy.deepcopy(model)
        params = perturbed(lf.init(reference, lf.LoRAConfig(r=4, alpha=8), seed=0))
        lf.apply(reference, params, batch).loss.backward()
        expected = {k: g.clone() for k, g in leaf_grads(params).items()}
        sharded_params = copied(params)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "DTensor"
        lf.apply(model, sharded_params, batch).loss.backward()
        got = leaf_grads(sharded_params)
        for key, g in expected.items():
            assert got[key] is not None, key
            torch.testing.assert_close(got[key], g, rtol=1e-5, atol=1e-7, msg=key)
        assert not [n for n, p in model.named_parameters() if p.grad is not None]
        if base_frozen:
            trainable, frozen = lf.split(copied(params))
            func = torch.func.grad(lambda t: lf.apply(model, lf.combine(t, frozen), batch).loss)(trainable)
            for p, k, _ in trainable.leaves():
                torch.testing.assert_close(func[p][k], expected[f"{p}.{k}"], rtol=1e-5, atol=1e-7, msg=f"{p}.{k}")
    finally:
        dist.destroy_process_group()


# -- K adapters and mixed batches ----------------------------------------------------------------------------------

K = 4


def bf16_qwen3(device) -> torch.nn.Module:
    """The tiny Qwen3 in bf16, frozen, its SDPA on CUDA's fused kernels (head_dim 16)."""
    return tiny_qwen3(num_hidden_layers=2).to(device, torch.bfloat16).requires_grad_(False)


def k_adapters(model, count: int = K) -> list[lf.Params]:
    cfg = lf.LoRAConfig(r=4, alpha=8)
    return [perturbed(lf.init(model, cfg, seed=s), scale=0.05, seed=20 + s) for s in range(count)]


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap falls back to a loop over a fused kernel
def test_k_adapters_in_one_pass_train_as_a_loop_in_bf16(device):
    """`vmap(grad)` over `lf.stack`, and one `adapter_ids` call on the batch repeated K times, on a bf16 base: each
    adapter's loss and gradients are as close to the float32 reference (the same weights in float32, one adapter at
    a time) as K separate bf16 runs are (twice their error, plus a floor of bf16's rounding)."""
    model = bf16_qwen3(device)
    reference = copy.deepcopy(model).float()
    batch = on(device, qwen3_batch())
    adapters = k_adapters(model)
    stacked = lf.stack(adapters)
    trainable, frozen = lf.split(stacked)
    grads, losses = torch.func.vmap(
        torch.func.grad_and_value(lambda t: lf.apply(model, lf.combine(t, frozen), batch).loss)
    )(trainable)
    rows = batch["input_ids"].shape[0]
    repeated = {name: t.repeat(K, 1) for name, t in batch.items()}
    ids = torch.arange(K, device=device).repeat_interleave(rows)
    (lf.apply(model, stacked, repeated, adapter_ids=ids).loss * K).backward()  # HF's loss: the mean over K blocks
    keys = [(p, k) for p, k, _ in trainable.leaves()]
    for k, params in enumerate(adapters):
        leaves = [params[p][leaf] for p, leaf in keys]
        exact_loss = lf.apply(reference, params, batch).loss
        exact = flat(torch.autograd.grad(exact_loss, leaves))
        loop_loss = lf.apply(model, params, batch).loss
        loop = flat(torch.autograd.grad(loop_loss, leaves))
        bound = 2 * relative(loop, exact) + FLOOR[torch.bfloat16]
        assert abs(losses[k].item() - exact_loss.item()) <= 2 * abs(loop_loss.item() - exact_loss.item()) + 1e-2
        for how, got in (
            ("vmap", flat(grads[p][leaf][k] for p, leaf in keys)),
            ("adapter_ids", flat(stacked[p][leaf].grad[k] for p, leaf in keys)),
        ):
            error = relative(got, exact)
            assert error <= bound, f"{how}, adapter {k}: {error:.4f} off float32 (a bf16 loop: {bound:.4f} allowed)"


def test_mixed_batch_equals_peft_adapter_names(device):
    """Rows with different adapters in one call: the logits of PEFT's `adapter_names` with the same adapters."""
    from peft import LoraConfig, get_peft_model

    model = tiny_qwen3().to(device).requires_grad_(False).eval()
    adapters = k_adapters(model)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(PROJECTIONS), lora_dropout=0.0)
    peft = get_peft_model(copy.deepcopy(model), cfg, adapter_name="adapter0")
    for k in range(1, K):
        peft.add_adapter(f"adapter{k}", cfg)
    targets = {t.path for t in adapters[0].targets}
    assert targets == {n for n, _ in model.named_modules() if n.endswith(PROJECTIONS)}
    with torch.no_grad():
        for k, params in enumerate(adapters):
            for path in targets:
                layer = peft.get_base_model().get_submodule(path)
                layer.lora_A[f"adapter{k}"].weight.copy_(params[path]["A"])
                layer.lora_B[f"adapter{k}"].weight.copy_(params[path]["B"])
    peft.eval()
    ids = on(device, qwen3_batch(batch=K))["input_ids"]
    with torch.no_grad():
        ours = lf.apply(model, lf.stack(adapters), {"input_ids": ids}, adapter_ids=torch.arange(K, device=device))
        theirs = peft(input_ids=ids, adapter_names=[f"adapter{k}" for k in range(K)])
        base = model(input_ids=ids)
    assert relative(theirs.logits, base.logits) > 1e-3  # the adapters act
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-4, atol=1e-5)


# -- torch.compile: inductor's Triton kernels, CUDA graphs ---------------------------------------------------------


@pytest.fixture
def dynamo():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield counters
    torch._dynamo.reset()


@pytest.mark.slow  # inductor generates and compiles Triton kernels for the forward and the backward
def test_inductor_training_step_on_cuda_equals_eager(device, dynamo):
    """One graph (`fullgraph=True`, no recompile) for two adapters in turn and the first again: each gets its own
    eager loss and gradients, not the first one's."""
    model = tiny_qwen3(num_hidden_layers=1).to(device).requires_grad_(False)
    batch = on(device, qwen3_batch())
    adapters = k_adapters(model, 2)
    frozen = lf.split(adapters[0])[1]
    before = snapshot(model)

    def loss_fn(trainable, batch):
        return lf.apply(model, lf.combine(trainable, frozen), batch).loss

    compiled = torch.compile(loss_fn, fullgraph=True)
    losses = []
    for params in (adapters[0], adapters[1], adapters[0]):
        trainable = lf.split(params)[0]
        leaves = [t for _, _, t in trainable.leaves()]
        loss = compiled(trainable, batch)
        grads = torch.autograd.grad(loss, leaves)
        eager = loss_fn(trainable, batch)
        torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
        for g, e in zip(grads, torch.autograd.grad(eager, leaves)):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
        losses.append(loss.item())
    assert losses[0] != losses[1] and losses[0] == pytest.approx(losses[2], rel=1e-6)
    assert dynamo["stats"]["unique_graphs"] == 1
    assert_untouched(model, before)


@pytest.mark.slow  # inductor compiles, then CUDA graphs are recorded
def test_cuda_graphs_follow_new_adapter_values(device, dynamo):
    """`torch.compile(mode="reduce-overhead")` records CUDA graphs of an adapted forward; replays with other leaf
    values (a second adapter, then the first after an in-place update) give eager's output for those values."""
    model = tiny_qwen3(num_hidden_layers=1).to(device).requires_grad_(False).eval()
    batch = {"input_ids": on(device, qwen3_batch())["input_ids"]}
    first, second = k_adapters(model, 2)
    frozen = lf.split(first)[1]

    def logits(trainable):
        return lf.apply(model, lf.combine(trainable, frozen), batch).logits

    compiled = torch.compile(logits, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):  # cudagraph trees record on a later call than the first
            compiled(lf.split(first)[0])
        moved = lf.split(first)[0]
        for _, _, t in moved.leaves():
            t.add_(0.01)  # as an optimizer step does
        for trainable in (lf.split(second)[0], moved):
            got = compiled(trainable).clone()  # a graph's output is overwritten by its next replay
            torch.testing.assert_close(got, logits(trainable), rtol=1e-4, atol=1e-5)
    assert dynamo["inductor"]["cudagraph_skips"] == 0, "inductor ran without CUDA graphs"


# -- memory ----------------------------------------------------------------------------------------------------------


def peak_bytes(fn, device) -> int:
    """The CUDA allocator's peak during `fn()`, above what was allocated before."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def test_training_step_allocates_no_base_gradient_and_no_more_than_peft(device):
    """On a base that requires grad (as loaded), a LoRA step leaves no base gradient and peaks at most 5% above
    PEFT's step on its frozen copy (the CUDA allocator's peak). A gradient of the MLP weights alone would add
    3 x 3 MiB per layer; on the CPU the two peaks agree to 0.01% (torch's profiler)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_qwen3(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, vocab_size=1024).to(device)
    assert all(p.requires_grad for p in model.parameters())
    batch = on(device, qwen3_batch(batch=2, seq=32, vocab=1024))
    params = lf.init(model, lf.LoRAConfig(r=8, alpha=16), seed=0)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=list(PROJECTIONS), lora_dropout=0.0)
    peft = get_peft_model(copy.deepcopy(model), cfg)

    def ours():
        lf.apply(model, params, batch).loss.backward()

    def theirs():
        peft(**batch).loss.backward()

    for step in (ours, theirs):
        step()  # the first step allocates the leaves' gradients, which later steps accumulate into
    ours_peak, theirs_peak = peak_bytes(ours, device), peak_bytes(theirs, device)
    assert not [n for n, p in model.named_parameters() if p.grad is not None]
    assert ours_peak <= 1.05 * theirs_peak, f"lora_func peaks at {ours_peak} bytes, PEFT at {theirs_peak}"
