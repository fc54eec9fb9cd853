"""Sharded bases: every variant on a tiny Qwen3 whose decoder layers and root torch's FSDP2
(`fully_shard`) has sharded over 2 gloo processes equals the same model unsharded, run by one process on the
global batch. One torchrun launch (`fsdp2_worker.py`) measures everything; the tests read its numbers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import lora_func as lf
from lora_func.variants import REGISTRY

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp2_worker.py")
TIMEOUT_S = 420  # about 2 minutes on 2 busy cores
MiB = 2**20


class Launch:
    """The worker on 2 gloo processes (torchrun, a fresh interpreter each), started at once; `results()` waits for
    it and reads what each rank wrote. Both launches of this file run side by side (each is idle much of the time,
    waiting on the other rank)."""

    def __init__(self, out, *mode: str) -> None:
        root = os.path.dirname(os.path.dirname(lf.__file__))
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
            MALLOC_MMAP_THRESHOLD_="65536",  # resident memory follows the live tensors (see `peak_bytes`)
            OMP_NUM_THREADS="1",
        )
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", WORKER]
        self.out, self.name = out, mode[0] if mode else "rank"
        self.log = open(out / "log.txt", "w+")
        self.process = subprocess.Popen(
            [*command, str(out), *mode], env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def results(self) -> list[dict]:
        try:
            code = self.process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"the FSDP2 workers did not finish within {TIMEOUT_S} s")
        if code != 0:
            self.log.seek(0)
            pytest.fail(f"the FSDP2 workers failed:\n{self.log.read()[-12000:]}")
        return [json.loads((self.out / f"{self.name}{r}.json").read_text()) for r in range(2)]

    def stop(self) -> None:
        """End this launch (torchrun and its workers: the session it leads) if it is still running."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="module", autouse=True)
def launches(request, tmp_path_factory):
    """The launches that the selected tests read, started together before the module's first test (which runs in
    this process meanwhile); each is ended at teardown if still running (a test that failed early)."""
    used = set().union(*(getattr(item, "fixturenames", ()) for item in request.session.items))
    started = {}
    if "measured" in used:
        started["variants"] = Launch(tmp_path_factory.mktemp("fsdp2"))
    if "trainer_runs" in used:
        started["trainer"] = Launch(tmp_path_factory.mktemp("trainer"), "trainer")
    yield started
    for launch in started.values():
        launch.stop()


@pytest.fixture(scope="module")
def measured(launches):
    """What each of the two ranks measured: {"variants": {name: {...}}, "frameworks", "qlora", "memory", ...}."""
    return launches["variants"].results()


@pytest.mark.slow  # DTensor's first use sets up its dispatch: seconds
def test_dtensor_leaves_are_refused_by_name(tmp_path):
    """The rule is plain replicated leaves: a DTensor leaf is refused before anything runs, naming the leaf.
    One gloo process (a world of 1), in this process: no second configuration runs here."""
    import torch.distributed as dist
    from components import qwen3_batch, tiny_qwen3
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = tiny_qwen3()
        params = lf.init(model, lf.LoRAConfig(r=2), seed=0)
        path = params.targets[0].path
        leaf = distribute_tensor(params[path]["A"].detach(), init_device_mesh("cpu", (1,)), [Replicate()])
        bad = params.replace({**{p: dict(e) for p, e in params.items()}, path: {**params[path], "A": leaf}})
        for call in (lambda: lf.apply(model, bad, qwen3_batch()), lambda: lf.save(bad, tmp_path / "a.safetensors")):
            with pytest.raises(ValueError, match=rf"leaf {path}\.A is a DTensor.*full_tensor"):
                call()
        assert not (tmp_path / "a.safetensors").exists()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_and_every_variant_ran(measured):
    zero, one = measured
    assert sorted(zero["variants"]) == sorted(REGISTRY)
    for name in REGISTRY:  # both ranks compared the same whole results (gathered) with the same reference
        for key in ("init", "merge", "delta", "save", "to_peft", "mixed_grads"):
            assert zero["variants"][name][key] == one["variants"][name][key], (name, key)


@pytest.mark.slow
def test_the_sharded_model_is_untouched(measured):
    """Invariants 1 and 13 on the sharded base as loaded, after every variant's init, apply, backward, merge,
    generate, AdapterModule and DDP ran on it: the same shards, flags and hooks; and a plain forward + backward
    then trains every base parameter, with the gradients of a model lora_func never touched."""
    for rank in measured:
        found = rank["untouched"]
        assert found["same"], "the sharded model changed"
        assert found["plain_call_grads"] == found["parameters"], found
        assert found["plain_call_grad_diff"] == 0.0, found


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_init_on_a_sharded_base_equals_init_on_the_whole_base(measured, name):
    """PiSSA's SVD, DoRA's and DeLoRA's norms, SSVD's and AntiPaSTO's SVDs read each layer's weight, gathered
    whole one layer at a time; EVA and AntiPaSTO calibrate through the sharded forward. Same leaves, plain tensors."""
    for rank in measured:
        found = rank["variants"][name]
        assert found["plain_leaves"], f"{name}: init on a sharded base gave DTensor leaves"
        assert found["init"] == 0.0, f"{name}: init differs by {found['init']}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_outputs_and_global_batch_gradients(measured, name):
    """Each rank runs its half of the batch; after `lf.all_reduce_grads` the adapter gradients are those of the
    whole batch on the whole model. The base as loaded (requires_grad=True), frozen, and as loaded under HF
    gradient checkpointing (reentrant and not); the base gets no gradient in any of them."""
    for rank in measured:
        found = rank["variants"][name]
        for label in ("loaded", "frozen", "reentrant", "nonreentrant"):
            assert found[f"out_{label}"] <= 1e-6, (name, label, found[f"out_{label}"])
            assert found[f"grads_{label}"] <= 1e-6, (name, label, found[f"grads_{label}"])
            assert found[f"base_grads_{label}"] == 0, (name, label, "base parameters got gradients")
        assert found["mixed_out"] <= 1e-6 and found["mixed_grads"] <= 1e-6, (name, "adapter_ids", found)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_torch_func_grad_on_a_sharded_base(measured, name):
    """`torch.func.grad` over `lf.split(params)[0]` (leaves requiring grad, as `init` gives them) on this rank's rows
    of the sharded base, averaged by `lf.all_reduce_grads`, equals it on the whole base and the global batch."""
    for rank in measured:
        assert rank["variants"][name]["func_grads"] <= 1e-6, (name, rank["variants"][name]["func_grads"])


@pytest.mark.slow
def test_modules_to_save_and_target_parameters_on_a_sharded_base(measured):
    """A classifier head trained as a full copy (`modules_to_save`; the copy is gathered whole at init, plain leaves)
    with LoRA and DoRA, and LoRA on a fused MoE layer's 3-D expert weights (`target_parameters`), each layer and the
    root sharded: init, outputs, gradients (autograd and torch.func) and merge equal the whole model's."""
    for rank in measured:
        found = rank["kinds"]
        assert found["modules_to_save_lora"]["kinds"] == ["linear", "saved"]
        assert found["target_parameters_lora"]["kinds"] == ["experts"]
        for label, m in found.items():
            assert m["plain_leaves"] and m["init"] == 0.0, (label, m)
            assert m["out"] <= 1e-6 and m["grads"] <= 1e-6 and m["func_grads"] <= 1e-6, (label, m)
            assert m["merge"] <= 1e-6 and m["merge_placed"] and m["base_grads"] == 0, (label, m)


@pytest.mark.slow
def test_mixed_precision_policy(measured):
    """FSDP2's `MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)` on a float32 base as loaded: the
    forward runs in bfloat16 (logits bfloat16), the adapter stays float32 (leaves and gradients), the base gets no
    gradient. Against the whole base with its parameters cast to bfloat16 (float buffers kept float32, as FSDP2
    keeps them) and the same float32 adapter: the logits are equal (measured bitwise; allowed one bfloat16 step,
    2**-8 relative); the averaged gradients equal the whole base's on the same rows averaged the same way (measured
    within 1e-8 relative; allowed 1e-5), and its gradients on the global batch within two bfloat16 steps (2**-7 of
    their scale; measured 3.7e-3 of it): the adapter's products run in the activations' dtype, so each rank's
    partial sum over its rows is rounded to bfloat16 before the float32 average."""
    for rank in measured:
        found = rank["mixed_precision"]
        assert found["sharded_dtype"] == "torch.float32"  # at rest: FSDP2 keeps the float32 shards
        for name in ("lora", "dora"):
            m = found[name]
            assert m["logits_dtype"] == "torch.bfloat16" and m["leaf_dtypes"] == ["torch.float32"], (name, m)
            assert m["out"] <= 2**-8 * m["out_scale"], (name, m)
            assert m["grads_same_rows"] <= 1e-5 * m["grad_scale"], (name, m)
            assert m["grads"] <= 2**-7 * m["grad_scale"], (name, m)
            assert m["func_grads"] <= 2**-7 * m["grad_scale"], (name, m)
            assert m["base_grads"] == 0, (name, m)


@pytest.mark.slow
def test_autocast_on_a_sharded_base(measured):
    """`torch.autocast("cpu", bfloat16)` over a float32 sharded base (no policy) against the float32 whole base under
    the same autocast: bfloat16 logits equal (allowed one bfloat16 step), averaged gradients equal to the whole
    base's on the same rows (allowed 1e-5 of their scale) and within two bfloat16 steps of its gradients on the
    global batch, for the same reason as under the policy."""
    for rank in measured:
        for name in ("lora", "dora"):
            m = rank["mixed_precision"][f"autocast_{name}"]
            assert m["logits_dtype"] == "torch.bfloat16", (name, m)
            assert m["out"] <= 2**-8 * m["out_scale"], (name, m)
            assert m["grads_same_rows"] <= 1e-5 * m["grad_scale"], (name, m)
            assert m["grads"] <= 2**-7 * m["grad_scale"], (name, m)
            assert m["base_grads"] == 0, (name, m)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_merge_delta_weights_save_and_to_peft(measured, name):
    """`merge`/`delta_weights` of the sharded base, gathered, equal the unsharded results; each merged weight is a
    DTensor placed as its base parameter, and a sharded model loaded with them computes what `lf.apply` does.
    One SGD step on the averaged gradients then `save`/`to_peft` write what the whole-batch reference writes."""
    for rank in measured:
        found = rank["variants"][name]
        if found["merge"] != "no weight form":  # ReFT: refused on both bases (checked in the worker)
            assert found["merge_placed"], f"{name}: merged weights are not placed as the base parameters"
            assert found["merge"] <= 1e-6 and found["delta"] <= 1e-6, (name, found["merge"], found["delta"])
            assert found["merged_forward"] <= 1e-5, (name, found["merged_forward"])
        assert found["moved"] > 1e-2, f"{name}: the SGD step did not move the adapter"
        assert found["save"] <= 1e-6, (name, found["save"])
        assert found["load"] == 0.0, (name, "lf.load against the sharded base", found["load"])
        assert found["to_peft"] == "not a PEFT method" or found["to_peft"] <= 1e-6, (name, found["to_peft"])
        if found["to_peft"] != "not a PEFT method":
            assert found["from_peft"] <= 1e-6, (name, "from_peft against the sharded base", found["from_peft"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "dora"])
def test_every_backward_idiom_under_checkpointing(measured, name):
    """Invariant 10 on a sharded base under HF gradient checkpointing (reentrant and not): the output dropped
    before backward, two losses summed, retain_graph and a second backward, torch.autograd.grad (not reentrant:
    torch refuses it there, sharded or not)."""
    for rank in measured:
        found = rank["idioms"][name]
        assert len(found) == 14
        for key, value in found.items():
            assert value == 0 if key.endswith("base_grads") else value <= 1e-6, (name, key, value)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "dora"])
def test_generate_adapter_module_and_ddp(measured, name):
    """`inject` + `generate` gives the whole model's tokens; `AdapterModule` with `all_reduce_grads`, and DDP over
    `AdapterModule`, give the global-batch gradients."""
    for rank in measured:
        found = rank["frameworks"][name]
        assert found["generate_same_tokens"]
        assert found["adapter_module_grads"] <= 1e-6 and found["ddp_grads"] <= 1e-6, found
        assert found["base_grads"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "dora", "pissa"])
def test_qlora_on_a_sharded_4bit_base(measured, name):
    """QLoRA + FSDP2: bitsandbytes nf4 layers with float32 `quant_storage`, their packed weights sharded by FSDP2,
    give the whole 4-bit model's init (DoRA and PiSSA dequantize each layer's gathered weight), outputs, adapter
    gradients and merged weights; `torch.func.grad` and mixed `adapter_ids` batches (both run bnb's layers through
    lora_func's transformable route, the sharded ones too) likewise."""
    for rank in measured:
        found = rank["qlora"]
        assert found["packed_sharded"], "FSDP2 did not shard the packed 4-bit weights"
        m = found[name]
        assert m["init"] == 0.0 and m["out"] <= 1e-6 and m["grads"] <= 1e-6 and m["merge"] <= 1e-6, m
        assert m["base_grads"] == 0
        assert m["func_grads"] <= 1e-6, ("torch.func.grad", m)
        assert m["mixed_out"] <= 1e-6 and m["mixed_grads"] <= 1e-6, ("adapter_ids", m)


@pytest.mark.slow
def test_merge_delta_weights_and_init_gather_one_layer_at_a_time(measured):
    """On 8 layers (56 targets, 30 MiB; 1 MiB the largest), each rank's peak resident memory during `merge` and
    `delta_weights` is its slice of the result plus a few single-layer temporaries, and during a weight-reading
    `init` a few single-layer temporaries: far from the targets' whole size, which gathering them all would add."""
    for rank in measured:
        m = rank["memory"]
        layer, whole = m["largest_target_bytes"], m["target_bytes"]
        assert whole >= 25 * layer
        for cfg in ("lora", "dora", "pissa"):
            assert m[f"{cfg}_init_sharded"] <= 12 * layer, (cfg, m[f"{cfg}_init_sharded"] / MiB)
            for fn in ("merge", "delta_weights"):
                result = m[f"{cfg}_{fn}_sharded_result"]
                assert result == whole // 2, (cfg, fn, result / MiB)  # this rank's half of every weight
                transient = m[f"{cfg}_{fn}_sharded"] - result
                assert transient <= 12 * layer, (cfg, fn, transient / MiB)


@pytest.fixture(scope="module")
def trainer_runs(launches):
    """HF Trainer runs over `lf.AdapterModule` (2 CPU processes under torchrun, one launch): see the tests below."""
    return launches["trainer"].results()


@pytest.mark.slow
def test_trainer_over_adapter_module_on_a_sharded_base(trainer_runs):
    """HF Trainer without FSDP settings over `lf.AdapterModule` on a base sharded by FSDP2 beforehand: accelerate
    wraps the module in DDP, the base's parameters are DTensors while it trains, the adapter ends where the same run
    on the whole base ends, the checkpoint holds the whole adapter, and resuming from the step-1 checkpoint ends
    where the uninterrupted run does."""
    for rank in trainer_runs:
        found = rank["ddp"]
        assert found["wrapper"] == "DistributedDataParallel"
        assert found["seen"] == [[True, ["Parameter"]]] * 2, found["seen"]  # base sharded, adapter plain
        assert found["moved"] > 1e-3
        assert found["vs_whole_base"] <= 1e-6 and found["resumed"] <= 1e-6, found
        assert found["checkpoint"] == 0.0


@pytest.mark.slow
def test_trainer_with_accelerates_fsdp2_plugin(trainer_runs):
    """HF Trainer with `fsdp_config={"version": 2}` (accelerate's FSDP2 plugin, honoured on CPU processes as on GPUs:
    see `accelerate_fsdp_on_cpu` in the worker) over `lf.AdapterModule` on a base sharded beforehand: accelerate makes
    the module an FSDP unit (the adapter's parameters DTensors between steps, like the base's), the adapter ends
    where the DDP run on the whole base ends, the step-2 checkpoint holds the whole adapter (every leaf at full shape,
    not one rank's shard), resuming from step 1 ends where the uninterrupted run does; and the plugin over a base
    not sharded beforehand is refused by name at the first step, and so is the plugin's `cpu_ram_efficient_loading`
    (it moves the module, the base with it, to the meta device and reloads only the module's state: the adapter)."""
    for rank in trainer_runs:
        found = rank["fsdp"]
        assert found["wrapper"] == "FSDPAdapterModule"
        assert found["seen"] == [[True, ["DTensor"]]] * 2, found["seen"]  # FSDP ran: base and adapter DTensors
        assert found["moved"] > 1e-3
        assert found["vs_whole_base"] <= 1e-6 and found["resumed"] <= 1e-6, found
        assert found["checkpoint"] == 0.0
        assert "sharded but the base model itself is not" in found["unsharded_base"], found["unsharded_base"]
        assert "on the meta device" in found["cpu_ram_efficient_loading"], found["cpu_ram_efficient_loading"]
