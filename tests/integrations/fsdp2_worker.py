"""One rank of `test_fsdp2.py`: every variant on a base sharded by FSDP2, against the same base unsharded.

Launched by the test as `torchrun --standalone --nproc-per-node 2 fsdp2_worker.py OUT_DIR [trainer]` (gloo, CPU). Every
rank builds the same tiny Qwen3 twice: one stays whole (the reference, run on the global batch), the other has
each decoder layer and the root sharded with `fully_shard` (run on this rank's half of the batch). Rank r writes
what it measured to OUT_DIR/rank<r>.json; the test asserts on the numbers. Maximum absolute differences:

- init: the sharded init's leaves against the unsharded init's (plain tensors, not DTensors).
- out/grads: logits of this rank's rows, and the trainable leaves' gradients after `lf.all_reduce_grads`,
  against the reference on the global batch; for the base as loaded (requires_grad=True), frozen, and as
  loaded under HF gradient checkpointing (reentrant and not); base gradients counted (must be none).
- mixed: two stacked adapters and the base, one per row (`adapter_ids`), logits and gradients.
- func_grads: `torch.func.grad` over the trainable half, averaged by `lf.all_reduce_grads`, against the
  reference's on the global batch.
- merge/delta: `lf.merge` / `lf.delta_weights` of the sharded base (DTensors placed as the base parameters,
  gathered here for the comparison) against the unsharded results; `merged_forward`: a sharded copy of the base
  with the merged weights loaded (`load_state_dict`) against `lf.apply`.
- save: after one SGD step on the averaged gradients, the saved file against the reference's after its step on
  the global batch; to_peft: the PEFT tensors, likewise (variants PEFT has).
- trainer (its own launch): HF Trainer over `lf.AdapterModule` on a sharded base, with DDP and with accelerate's
  FSDP2 plugin, see `trainer`.
- qlora: LoRA, DoRA, PiSSA on a bitsandbytes 4-bit base sharded by FSDP2, against it whole (also torch.func and
  adapter_ids batches); mixed_precision: FSDP2's MixedPrecisionPolicy (bf16 params, fp32 reduce) and autocast;
  kinds: modules_to_save and target_parameters (fused MoE experts).
- memory: the peak resident bytes above the start during `merge`, `delta_weights` and `init` on a larger Qwen3,
  against the whole model's, the result's and the largest target weight's bytes.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for components

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from components import hook_count, perturbed, qwen3_batch, tiny_config, tiny_qwen3  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import lora_func as lf  # noqa: E402
from lora_func._variant import Intervention  # noqa: E402
from lora_func.variants import REGISTRY  # noqa: E402

WORLD = 2
ROWS = 2  # per rank


def shard_model(model, mesh):
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def rows(batch, rank):
    return {k: v[rank * ROWS : (rank + 1) * ROWS] for k, v in batch.items()}


def max_diff(a, b) -> float:
    a = a.full_tensor() if isinstance(a, DTensor) else a
    b = b.full_tensor() if isinstance(b, DTensor) else b
    return (a.detach().double() - b.detach().double()).abs().max().item()


def dict_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise AssertionError(f"keys differ: {sorted(set(a) ^ set(b))[:4]}")
    return max(max_diff(a[k], b[k]) for k in a)


def leaf_dict(params) -> dict:
    return {(path, leaf): t for path, leaf, t in params.leaves()}


def grad_diff(p, q) -> float:
    pairs = zip(lf.split(p)[0].leaves(), lf.split(q)[0].leaves())
    return max(max_diff(a.grad, b.grad) for (_, _, a), (_, _, b) in pairs)


def base_grads(model) -> int:
    return sum(p.grad is not None for p in model.parameters())


def make(name, model, batch):
    cfg = tiny_config(name, r=4)
    if REGISTRY[name].calibrated:  # the same calibration batches on every rank: the same adapter everywhere
        return lf.init(model, cfg, seed=0, calibration_data=[batch], progress=False)
    return lf.init(model, cfg, seed=0)


def train_step(model, params, batch, world_sync: bool) -> dict:
    """Forward + backward (+ all_reduce_grads): the logits, then an SGD step on the leaves in place."""
    out = lf.apply(model, params, batch)
    out.loss.backward()
    if world_sync:
        lf.all_reduce_grads(params)
    return out.logits.detach()


def sgd(params):
    with torch.no_grad():
        for t in lf.trainable_leaves(params):
            t -= 0.5 * t.grad


def _refuses(fn, model, params) -> bool:
    try:
        fn(model, params)
    except ValueError:
        return True
    return False


def merge_results(sharded, trained, reference, ref, local) -> dict:
    """`merge` and `delta_weights` of the sharded base against the unsharded ones, and the merged model's forward."""
    found = {}
    with torch.no_grad():
        merged = lf.merge(sharded, trained)
        found["merge_placed"] = all(
            isinstance(v, DTensor) and v.placements == sharded.get_parameter(k).placements for k, v in merged.items()
        )
        found["merge"] = dict_diff(merged, lf.merge(reference, ref))
        found["delta"] = dict_diff(lf.delta_weights(sharded, trained), lf.delta_weights(reference, ref))
        copy = models_copy(sharded)
        copy.load_state_dict(merged, strict=False)
        found["merged_forward"] = max_diff(copy(**local).logits, lf.apply(sharded, trained, local).logits)
    return found


def compare_variant(name, rank, models, global_batch, local, scratch) -> dict:
    reference, sharded, frozen, checkpointed = models
    found: dict[str, float | int | str] = {}
    ref_init = make(name, reference, global_batch)
    sh_init = make(name, sharded, global_batch)
    found["plain_leaves"] = all(type(t) is torch.Tensor for _, _, t in sh_init.leaves())
    found["init"] = dict_diff(leaf_dict(sh_init), leaf_dict(ref_init))

    ref = perturbed(ref_init)
    ref_logits = train_step(reference, ref, global_batch, world_sync=False)
    mine = slice(rank * ROWS, (rank + 1) * ROWS)
    for label, model in (("loaded", sharded), ("frozen", frozen), *checkpointed.items()):
        p = perturbed(make(name, model, global_batch))
        logits = train_step(model, p, local, world_sync=True)
        found[f"out_{label}"] = max_diff(logits, ref_logits[mine])
        found[f"grads_{label}"] = grad_diff(p, ref)
        found[f"base_grads_{label}"] = base_grads(model)
        if label == "loaded":
            trained = p

    # merge and delta_weights before the step (the reference's leaves are those of `trained`)
    if REGISTRY[name].capability(Intervention) is not None:  # ReFT: no weight form, refused on both bases
        for fn in (lf.merge, lf.delta_weights):
            refused = [_refuses(fn, model, p) for model, p in ((sharded, trained), (reference, ref))]
            assert refused == [True, True], (name, fn.__name__, refused)
        found["merge"] = found["delta"] = "no weight form"
    else:
        found.update(merge_results(sharded, trained, reference, ref, local))

    sgd(trained)
    sgd(ref)
    if rank == 0:
        lf.save(trained, os.path.join(scratch, f"{name}-sharded.safetensors"))
        lf.save(ref, os.path.join(scratch, f"{name}-reference.safetensors"))
    dist.barrier()
    found["save"] = dict_diff(
        load_file(os.path.join(scratch, f"{name}-sharded.safetensors")),
        load_file(os.path.join(scratch, f"{name}-reference.safetensors")),
    )
    found["moved"] = dict_diff(leaf_dict(ref), leaf_dict(ref_init))
    loaded = lf.load(os.path.join(scratch, f"{name}-sharded.safetensors"), sharded)  # checked against the sharded base
    found["load"] = dict_diff(leaf_dict(loaded), leaf_dict(trained))
    found["to_peft"] = to_peft_diff(name, trained, ref, sharded, reference, rank, scratch)
    if found["to_peft"] != "not a PEFT method":  # and back, read against the sharded base
        back = lf.from_peft(os.path.join(scratch, f"{name}-peft-sharded"), sharded)
        expected = lf.from_peft(os.path.join(scratch, f"{name}-peft-reference"), reference)
        found["from_peft"] = dict_diff(leaf_dict(back), leaf_dict(expected))

    # torch.func: the gradient pytree of the trainable half (leaves requiring grad, as init gives them), averaged
    found["func_grads"] = func_grad_diff(sharded, reference, sh_init, ref_init, global_batch, local)

    # mixed adapters per row: two perturbed adapters and the base model
    ids = torch.tensor([0, 1, -1, 1])
    ref_stack = lf.stack([perturbed(ref_init, seed=5), perturbed(ref_init, seed=6)])
    sh_stack = lf.stack([perturbed(sh_init, seed=5), perturbed(sh_init, seed=6)])
    ref_out = lf.apply(reference, ref_stack, global_batch, adapter_ids=ids)
    ref_out.loss.backward()
    out = lf.apply(sharded, sh_stack, local, adapter_ids=ids[mine])
    out.loss.backward()
    lf.all_reduce_grads(sh_stack)
    found["mixed_out"] = max_diff(out.logits, ref_out.logits[mine])
    found["mixed_grads"] = grad_diff(sh_stack, ref_stack)
    return found


def func_grads(model, params, batch) -> lf.Params:
    """`torch.func.grad` of the loss over the trainable half of `params` (the frozen half held fixed)."""
    trainable, frozen = lf.split(params)
    return torch.func.grad(lambda t: lf.apply(model, lf.combine(t, frozen), batch).loss)(trainable)


def func_grad_diff(sharded, reference, sh_init, ref_init, global_batch, local) -> float:
    """The sharded base's `torch.func.grad` on this rank's rows, averaged by `lf.all_reduce_grads`, against the
    whole base's on the global batch."""
    expected = func_grads(reference, perturbed(ref_init), global_batch)
    found = lf.all_reduce_grads(func_grads(sharded, perturbed(sh_init), local))
    return max(max_diff(a, b) for (_, _, a), (_, _, b) in zip(found.leaves(), expected.leaves()))


IDIOMS = {  # the ways real loops call backward (invariant 10): each returns the gradients of the trainable leaves
    "dropped_output": lambda model, p, b: torch.autograd.backward(lf.apply(model, p, b).loss / 2),
    "summed_losses": lambda model, p, b: (lf.apply(model, p, b).loss + 0.5 * lf.apply(model, p, b).loss).backward(),
    "retain_graph_twice": lambda model, p, b: _twice(lf.apply(model, p, b).loss),
    "autograd_grad": lambda model, p, b: _into_grad(p, lf.apply(model, p, b).loss),
}


def _twice(loss):
    loss.backward(retain_graph=True)
    loss.backward()


def _into_grad(params, loss):
    leaves = lf.trainable_leaves(params)
    for t, g in zip(leaves, torch.autograd.grad(loss, leaves)):
        t.grad = g


def idioms(name, reference, checkpointed, global_batch, local) -> dict:
    """Each backward idiom on the checkpointed sharded bases (reentrant and not), after `all_reduce_grads`,
    against the same idiom on the whole base and the global batch."""
    found = {}
    for idiom, step in IDIOMS.items():
        ref = perturbed(make(name, reference, global_batch))
        step(reference, ref, global_batch)
        for label, model in checkpointed.items():
            if idiom == "autograd_grad" and label == "reentrant":
                continue  # torch's own limit: reentrant checkpointing refuses .grad() (tests/contract covers it)
            p = perturbed(make(name, model, global_batch))
            step(model, p, local)
            lf.all_reduce_grads(p)
            found[f"{idiom}_{label}"] = grad_diff(p, ref)
            found[f"{idiom}_{label}_base_grads"] = base_grads(model)
    return found


def frameworks(name, rank, reference, sharded, global_batch, local) -> dict:
    """`inject` + `generate`, `AdapterModule` with `all_reduce_grads`, and DDP over `AdapterModule`."""
    from torch.nn.parallel import DistributedDataParallel

    found: dict[str, float] = {}
    ref = perturbed(make(name, reference, global_batch))
    train_step(reference, ref, global_batch, world_sync=False)
    prompt = global_batch["input_ids"][:, :6]  # the same prompts on every rank: the same number of steps
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with lf.inject(reference, ref):
            expected = reference.generate(input_ids=prompt, **settings)
        with lf.inject(sharded, ref):
            tokens = sharded.generate(input_ids=prompt, **settings)
    found["generate_same_tokens"] = bool(torch.equal(tokens, expected))

    module = lf.AdapterModule(sharded, perturbed(make(name, sharded, global_batch)))
    module(**local).loss.backward()
    lf.all_reduce_grads(module.params)
    found["adapter_module_grads"] = grad_diff(module.params, ref)

    module = lf.AdapterModule(sharded, perturbed(make(name, sharded, global_batch)))
    ddp = DistributedDataParallel(module)
    ddp(**local).loss.backward()
    found["ddp_grads"] = grad_diff(module.params, ref)
    found["base_grads"] = base_grads(sharded)
    return found


def quantized_qwen3() -> torch.nn.Module:
    """The tiny Qwen3 with bitsandbytes 4-bit (nf4) decoder linears whose packed weights are stored as float32
    (`quant_storage`), which FSDP2 can shard like any float parameter."""
    import bitsandbytes as bnb

    model = tiny_qwen3()
    for module in list(model.model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.float32,
                    quant_type="nf4",
                    quant_storage=torch.float32,
                )
                q.load_state_dict(child.state_dict())
                setattr(module, name, q.to("cpu"))  # moving quantizes
    return model


def qlora(rank, mesh, global_batch, local) -> dict:
    """QLoRA + FSDP2: the 4-bit base sharded against the same 4-bit base whole, for variants that read the weight
    (dequantized, gathered) and one that does not."""
    reference, sharded = quantized_qwen3(), shard_model(quantized_qwen3(), mesh)
    mine = slice(rank * ROWS, (rank + 1) * ROWS)
    found: dict = {"packed_sharded": isinstance(sharded.model.layers[0].mlp.up_proj.weight, DTensor)}
    for name in ("lora", "dora", "pissa"):
        ref_init, sh_init = make(name, reference, global_batch), make(name, sharded, global_batch)
        ref, p = perturbed(ref_init), perturbed(sh_init)
        ref_logits = train_step(reference, ref, global_batch, world_sync=False)
        logits = train_step(sharded, p, local, world_sync=True)
        with torch.no_grad():
            merge = dict_diff(lf.merge(sharded, p), lf.merge(reference, ref))
        ids = torch.tensor([0, 1, -1, 1])
        ref_stack = lf.stack([perturbed(ref_init, seed=5), perturbed(ref_init, seed=6)])
        sh_stack = lf.stack([perturbed(sh_init, seed=5), perturbed(sh_init, seed=6)])
        ref_out = lf.apply(reference, ref_stack, global_batch, adapter_ids=ids)
        ref_out.loss.backward()
        out = lf.apply(sharded, sh_stack, local, adapter_ids=ids[mine])
        out.loss.backward()
        lf.all_reduce_grads(sh_stack)
        found[name] = {
            "init": dict_diff(leaf_dict(sh_init), leaf_dict(ref_init)),
            "out": max_diff(logits, ref_logits[mine]),
            "grads": grad_diff(p, ref),
            "merge": merge,
            "base_grads": base_grads(sharded),
            "func_grads": func_grad_diff(sharded, reference, sh_init, ref_init, global_batch, local),
            "mixed_out": max_diff(out.logits, ref_out.logits[mine]),
            "mixed_grads": grad_diff(sh_stack, ref_stack),
        }
    return found


def other_kinds(rank, mesh) -> dict:
    """`modules_to_save` (a BERT classifier's fresh head, trained as a full copy: its parameters sit in the root's
    FSDP2 unit) and `target_parameters` (the 3-D expert weights of a Qwen3-MoE's fused experts), each decoder or
    encoder layer and the root sharded, against the same model whole on the global batch: init (the head's copy
    gathered whole: plain leaves), outputs, gradients after `all_reduce_grads`, `torch.func.grad`, `merge`."""
    from components import classification_batch, tiny_bert_classifier, tiny_qwen3_moe

    def sharded(model, layers):
        for layer in layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    bert_layers, moe_layers = (lambda m: m.bert.encoder.layer), (lambda m: m.model.layers)
    experts = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    cases = {
        "modules_to_save_lora": (
            tiny_bert_classifier,
            bert_layers,
            classification_batch(batch=ROWS * WORLD),
            lf.LoRAConfig(r=4, modules_to_save=("classifier",)),
        ),
        "modules_to_save_dora": (
            tiny_bert_classifier,
            bert_layers,
            classification_batch(batch=ROWS * WORLD),
            lf.DoRAConfig(r=4, modules_to_save=("classifier",)),
        ),
        "target_parameters_lora": (
            tiny_qwen3_moe,
            moe_layers,
            qwen3_batch(batch=ROWS * WORLD, seq=12),
            lf.LoRAConfig(r=2, target_names=(), target_parameters=experts),
        ),
    }
    mine = slice(rank * ROWS, (rank + 1) * ROWS)
    found = {}
    for label, (build, layers, global_batch, cfg) in cases.items():
        local = rows(global_batch, rank)
        reference, model = build(), sharded(build(), layers)
        ref_init, sh_init = lf.init(reference, cfg, seed=0), lf.init(model, cfg, seed=0)
        ref, p = perturbed(ref_init), perturbed(sh_init)
        ref_out = lf.apply(reference, ref, global_batch)
        ref_out.loss.backward()
        out = lf.apply(model, p, local)
        out.loss.backward()
        lf.all_reduce_grads(p)
        with torch.no_grad():
            merged = lf.merge(model, p)
            merge = dict_diff(merged, lf.merge(reference, ref))
        found[label] = {
            "kinds": sorted({t.kind for t in p.targets}),
            "plain_leaves": all(type(t) is torch.Tensor for _, _, t in sh_init.leaves()),
            "init": dict_diff(leaf_dict(sh_init), leaf_dict(ref_init)),
            "out": max_diff(out.logits, ref_out.logits[mine]),
            "grads": grad_diff(p, ref),
            "func_grads": func_grad_diff(model, reference, sh_init, ref_init, global_batch, local),
            "base_grads": base_grads(model),
            "merge": merge,
            "merge_placed": all(isinstance(v, DTensor) for v in merged.values()),
        }
    return found


def mixed_precision(rank, mesh, global_batch, local, plain_sharded, reference_fp32) -> dict:
    """FSDP2's `MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)` on each decoder layer and the root
    of the float32 base (as loaded), against the whole base with its parameters cast to bfloat16 (its float buffers,
    the rotary frequencies, kept float32 as FSDP2 keeps them): the same float32 adapter on both, logits and adapter
    gradients after `all_reduce_grads`, against the whole base on the global batch and, to separate the bfloat16
    rounding of each rank's partial sums, on this rank's rows averaged the same way; `lf.apply` and
    `torch.func.grad`. And `torch.autocast` (bfloat16) instead of a policy: the float32 sharded base against the
    float32 whole base under the same autocast."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    sharded = tiny_qwen3()
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(sharded, mesh=mesh, mp_policy=policy)
    reference = tiny_qwen3()
    with torch.no_grad():
        for param in reference.parameters():
            param.data = param.data.to(torch.bfloat16)
    mine = slice(rank * ROWS, (rank + 1) * ROWS)
    found: dict = {"sharded_dtype": str(sharded.model.layers[0].mlp.up_proj.weight.dtype)}
    for name in ("lora", "dora"):
        start = make(name, tiny_qwen3(), global_batch)  # float32 leaves, read from the float32 weights
        ref, p = perturbed(start), perturbed(start)
        ref_out = lf.apply(reference, ref, global_batch)
        ref_out.loss.backward()
        out = lf.apply(sharded, p, local)
        out.loss.backward()
        lf.all_reduce_grads(p)
        same_rows = perturbed(start)  # the whole base on this rank's rows, averaged the same way
        lf.apply(reference, same_rows, local).loss.backward()
        lf.all_reduce_grads(same_rows)
        scale = max(t.grad.abs().max().item() for t in lf.trainable_leaves(ref))
        found[name] = {
            "logits_dtype": str(out.logits.dtype),
            "out": max_diff(out.logits, ref_out.logits[mine]),
            "out_scale": ref_out.logits.abs().max().item(),
            "grads": grad_diff(p, ref),
            "grads_same_rows": grad_diff(p, same_rows),
            "grad_scale": scale,
            "func_grads": func_grad_diff(sharded, reference, start, start, global_batch, local),
            "base_grads": base_grads(sharded),
            "leaf_dtypes": sorted(
                {str(t.dtype) for t in lf.trainable_leaves(p)} | {str(t.grad.dtype) for t in lf.trainable_leaves(p)}
            ),
        }
    for name in ("lora", "dora"):  # autocast instead of a policy: the float32 base sharded, and whole
        start = make(name, tiny_qwen3(), global_batch)
        ref, p, same_rows = perturbed(start), perturbed(start), perturbed(start)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_out = lf.apply(reference_fp32, ref, global_batch)
            ref_out.loss.backward()
            out = lf.apply(plain_sharded, p, local)
            out.loss.backward()
            lf.apply(reference_fp32, same_rows, local).loss.backward()
        lf.all_reduce_grads(p)
        lf.all_reduce_grads(same_rows)
        found[f"autocast_{name}"] = {
            "logits_dtype": str(out.logits.dtype),
            "out": max_diff(out.logits, ref_out.logits[mine]),
            "out_scale": ref_out.logits.abs().max().item(),
            "grads": grad_diff(p, ref),
            "grads_same_rows": grad_diff(p, same_rows),
            "grad_scale": max(t.grad.abs().max().item() for t in lf.trainable_leaves(ref)),
            "base_grads": base_grads(plain_sharded),
        }
    return found


_COPY = {}


def models_copy(sharded):
    """A second sharded base (built once), reset to the base weights: where merged weights are loaded."""
    if "model" not in _COPY:
        _COPY["model"] = shard_model(tiny_qwen3(), _COPY["mesh"])
    model = _COPY["model"]
    model.load_state_dict(sharded.state_dict())
    return model


def to_peft_diff(name, trained, ref, sharded, reference, rank, scratch) -> float | str:
    """The PEFT files written from the sharded run against the reference's; where to_peft refuses the method,
    "not a PEFT method" if it refuses both the same way."""
    if rank == 0:
        outcomes = []
        for label, params, model in (("sharded", trained, sharded), ("reference", ref, reference)):
            try:
                lf.to_peft(params, os.path.join(scratch, f"{name}-peft-{label}"), model=model)
                outcomes.append("written")
            except ValueError as e:
                outcomes.append(str(e))
        box = [outcomes]
    else:
        box = [None]
    dist.broadcast_object_list(box, src=0)
    sharded_outcome, reference_outcome = box[0]
    if sharded_outcome != reference_outcome:
        return f"sharded: {sharded_outcome}; reference: {reference_outcome}"
    if sharded_outcome != "written":
        return "not a PEFT method"
    folders = [os.path.join(scratch, f"{name}-peft-{k}") for k in ("sharded", "reference")]
    configs = [open(os.path.join(f, "adapter_config.json")).read() for f in folders]
    if configs[0] != configs[1]:
        return "configs differ"
    return dict_diff(*(load_file(os.path.join(f, "adapter_model.safetensors")) for f in folders))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_bytes(fn):
    """(the process's peak resident bytes above those at the start while `fn` ran, `fn`'s result).

    Linux's high-water mark, reset first (/proc/self/clear_refs); the test runs this worker with glibc's
    MALLOC_MMAP_THRESHOLD_ low, so that every tensor of some size is its own mapping, returned when freed, and
    resident memory follows the tensors alive. (torch's profiler misses the frees that gloo's threads make.)"""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _status("VmRSS")
    result = fn()
    return _status("VmHWM") - start, result


def held_bytes(tensors: dict) -> int:
    """Bytes of the storages that the values of `tensors` (DTensors: their local tensors) keep alive."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors.values()]
    return sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in local}.values())


def memory(mesh, layers: int = 8) -> dict:
    """Peak resident bytes of merge, delta_weights and a weight-reading init on a Qwen3 large enough that one
    layer's weights stand out from the bookkeeping (`layers` layers, 256 wide, MLP 1024: 1 MiB per MLP weight)."""
    shape = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=layers, num_attention_heads=4, head_dim=64)
    model = shard_model(tiny_qwen3(**shape), mesh)
    whole = tiny_qwen3(**shape)
    found = {"model_bytes": sum(p.numel() * p.element_size() for p in whole.parameters())}
    for cfg_name, cfg in (("lora", lf.LoRAConfig(r=8)), ("dora", lf.DoRAConfig(r=8)), ("pissa", lf.PiSSAConfig(r=8))):
        targets = lf.targets(whole, cfg)
        found["largest_target_bytes"] = max(t.d_in * t.d_out * 4 for t in targets)
        found["target_bytes"] = sum(t.d_in * t.d_out * 4 for t in targets)
        for where, m in (("sharded", model), ("whole", whole)):
            peak, params = peak_bytes(lambda m=m, cfg=cfg: lf.init(m, cfg, seed=0))
            found[f"{cfg_name}_init_{where}"] = peak
            params = perturbed(params)
            with torch.no_grad():
                for fn in (lf.merge, lf.delta_weights):
                    peak, out = peak_bytes(lambda m=m, fn=fn, params=params: fn(m, params))
                    found[f"{cfg_name}_{fn.__name__}_{where}"] = peak
                    found[f"{cfg_name}_{fn.__name__}_{where}_result"] = held_bytes(out)
                    del out
    return found


def shard_like_accelerate(model, mesh):
    """FSDP2 units in the layout accelerate's FSDP2 plugin gives a model: the input embedding, each decoder layer,
    [final norm, output head] (kept gathered after forward), then the root. A base sharded so before it is wrapped in
    `lf.AdapterModule`: accelerate finds these pieces already sharded and leaves them."""
    fully_shard(model.model.embed_tokens, mesh=mesh)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard([model.model.norm, model.lm_head], mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def accelerate_fsdp_on_cpu():
    """Accelerate's FSDP plugin, honoured on CPU processes.

    Stock accelerate (1.15) turns FSDP on only for accelerator devices: on CPU processes `AcceleratorState` keeps
    `DistributedType.MULTI_CPU` and drops the plugin (HF Trainer then wraps in DDP, FSDP settings ignored). Here,
    where it dropped a plugin it was given, the state is set as it is on GPUs (`DistributedType.FSDP`, the plugin
    kept); everything after that (`fsdp2_prepare_model`, the optimizer, checkpoints) is accelerate's own code."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState._reset_state(reset_partial_state=True)
    AcceleratorState.__init__ = init
    try:
        yield
    finally:
        AcceleratorState.__init__ = original
        AcceleratorState._reset_state(reset_partial_state=True)


def trainer(rank, mesh, out_dir) -> dict:
    """HF Trainer (2 CPU processes) over `lf.AdapterModule` on a base sharded by FSDP2 beforehand, two ways:

    - "ddp": no FSDP settings; accelerate wraps the module in DDP, which averages the adapter's gradients.
    - "fsdp": accelerate's FSDP2 plugin (`fsdp_version: 2`); accelerate makes the module an FSDP unit (the adapter
      gathered for each forward, its gradients averaged by reduce-scatter) and leaves the base's units as they are.

    Each against the same DDP run on the whole base; a run resumed from its step-1 checkpoint against the
    uninterrupted one; the checkpoint's tensors (whole, every leaf). And the plugin over a base not sharded
    beforehand, and with `cpu_ram_efficient_loading`: refused by name at the first step."""
    from safetensors.torch import load_file
    from test_trainer import collate, dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Probe(TrainerCallback):
        def __init__(self, base, module):
            self.base, self.module, self.seen = base, module, []

        def on_step_end(self, args, state, control, **kwargs):
            q = self.base.model.layers[0].self_attn.q_proj.weight
            adapter = [type(p).__name__ for p in self.module.parameters()]
            self.seen.append((isinstance(q, DTensor), sorted(set(adapter))))

    def run(base, name: str, fsdp: bool = False, resume: str | None = None, **fsdp_config):
        module = lf.AdapterModule(base, lf.init(base, lf.LoRAConfig(r=4, alpha=8), seed=0))
        args = TrainingArguments(
            output_dir=os.path.join(out_dir, name),
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_steps=2,
            save_strategy="steps",
            save_steps=1,
            report_to=[],
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
            dataloader_num_workers=0,
            **(dict(fsdp="full_shard", fsdp_config={"version": 2, **fsdp_config}) if fsdp else {}),
        )
        probe = Probe(base, module)
        run = Trainer(model=module, args=args, train_dataset=dataset(8), data_collator=collate, callbacks=[probe])
        if fsdp:
            assert run.accelerator.is_fsdp2, "accelerate did not take the FSDP2 plugin"
        run.train(resume_from_checkpoint=resume)
        return module, probe.seen, type(run.model_wrapped).__name__, run

    def final(module) -> dict:  # the whole adapter (FSDP's units hold shards between steps)
        return {(p, leaf): t.full_tensor() if isinstance(t, DTensor) else t for p, leaf, t in module.params.leaves()}

    def checkpoint(name, step, values) -> float:
        saved = load_file(os.path.join(out_dir, name, f"checkpoint-{step}", "model.safetensors"))
        return dict_diff(
            {k.removeprefix("adapter."): v for k, v in saved.items()},
            {f"{p}.{leaf}": t for (p, leaf), t in values.items()},
        )

    start = leaf_dict(lf.init(tiny_qwen3(), lf.LoRAConfig(r=4, alpha=8), seed=0))
    found = {}
    whole, _, _, _ = run(tiny_qwen3(), "whole")
    reference = leaf_dict(whole.params)
    ddp, seen, wrapper, _ = run(shard_model(tiny_qwen3(), mesh), "ddp")
    ckpt = os.path.join(out_dir, "ddp", "checkpoint-1")
    resumed, _, _, _ = run(shard_model(tiny_qwen3(), mesh), "ddp-resumed", resume=ckpt)
    found["ddp"] = {
        "wrapper": wrapper,
        "seen": seen,
        "vs_whole_base": dict_diff(leaf_dict(ddp.params), reference),
        "resumed": dict_diff(leaf_dict(ddp.params), leaf_dict(resumed.params)),
        "moved": dict_diff(leaf_dict(ddp.params), start),
        "checkpoint": checkpoint("ddp", 2, leaf_dict(ddp.params)),
    }
    with accelerate_fsdp_on_cpu():
        fsdp, seen, wrapper, _ = run(shard_like_accelerate(tiny_qwen3(), mesh), "fsdp", fsdp=True)
        values = final(fsdp)
        ckpt = os.path.join(out_dir, "fsdp", "checkpoint-1")
        resumed, _, _, _ = run(shard_like_accelerate(tiny_qwen3(), mesh), "fsdp-resumed", fsdp=True, resume=ckpt)
        found["fsdp"] = {
            "wrapper": wrapper,
            "seen": seen,
            "vs_whole_base": dict_diff(values, reference),
            "resumed": dict_diff(values, final(resumed)),
            "moved": dict_diff(values, start),
            "checkpoint": checkpoint("fsdp", 2, values),
        }
        try:
            run(tiny_qwen3(), "fsdp-unsharded", fsdp=True)
            found["fsdp"]["unsharded_base"] = "trained"
        except ValueError as e:
            found["fsdp"]["unsharded_base"] = str(e)
        try:  # the plugin moves the module (the base with it) to meta and reloads its state_dict: the adapter only
            run(shard_like_accelerate(tiny_qwen3(), mesh), "fsdp-meta", fsdp=True, cpu_ram_efficient_loading=True)
            found["fsdp"]["cpu_ram_efficient_loading"] = "trained"
        except ValueError as e:
            found["fsdp"]["cpu_ram_efficient_loading"] = str(e)
    return found


def local_state(model) -> dict:
    """This rank's shard of every parameter and buffer, with the flags: what lora_func must leave as it was."""
    state = {k: (v.to_local() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.state_dict().items()}
    return {
        "state": state,
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": hook_count(model),
    }


def untouched(model, before) -> dict:
    """After everything lora_func did to `model`: the same shards, flags and hooks, and a plain forward + backward
    trains the base as on a model lora_func never touched (same base gradients, every parameter)."""
    now = local_state(model)
    same = now["flags"] == before["flags"] and now["hooks"] == before["hooks"]
    same = same and all(torch.equal(now["state"][k], v) for k, v in before["state"].items())
    fresh = shard_model(tiny_qwen3(), _COPY["mesh"])
    batch = qwen3_batch(batch=2, seq=12)
    model(**batch).loss.backward()
    fresh(**batch).loss.backward()
    grads = [(a.grad, b.grad) for a, b in zip(model.parameters(), fresh.parameters())]
    model.zero_grad(set_to_none=True)
    return {
        "same": same,
        "plain_call_grads": sum(a is not None for a, _ in grads),
        "parameters": len(grads),
        "plain_call_grad_diff": max(max_diff(a, b) for a, b in grads if a is not None),
    }


def main(out_dir: str, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        _COPY["mesh"] = mesh
        if mode == "trainer":
            with open(os.path.join(out_dir, f"trainer{rank}.json"), "w") as f:
                json.dump(trainer(rank, mesh, out_dir), f, indent=1)
            return
        global_batch = qwen3_batch(batch=ROWS * WORLD, seq=12)
        local = rows(global_batch, rank)
        reference = tiny_qwen3()  # as loaded: parameters require grad
        sharded = shard_model(tiny_qwen3(), mesh)
        frozen = shard_model(tiny_qwen3().requires_grad_(False), mesh)
        checkpointed = {}
        for reentrant in (True, False):
            model = tiny_qwen3()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            checkpointed["reentrant" if reentrant else "nonreentrant"] = shard_model(model, mesh)
        models = (reference, sharded, frozen, checkpointed)
        before = local_state(sharded)
        results: dict = {"variants": {}, "seconds": {}}
        clock = time.perf_counter()

        def timed(section: str) -> None:  # wall seconds per section, for the record (the tests assert no times)
            nonlocal clock
            now = time.perf_counter()
            results["seconds"][section] = round(now - clock, 2)
            clock = now

        with tempfile.TemporaryDirectory() as scratch:
            box = [scratch]
            dist.broadcast_object_list(box, src=0)  # one scratch folder (rank 0's) for the files both compare
            for name in sorted(REGISTRY):
                results["variants"][name] = compare_variant(name, rank, models, global_batch, local, box[0])
            dist.barrier()
        timed("variants")
        results["frameworks"] = {
            n: frameworks(n, rank, reference, sharded, global_batch, local) for n in ("lora", "dora")
        }
        timed("frameworks")
        results["idioms"] = {n: idioms(n, reference, checkpointed, global_batch, local) for n in ("lora", "dora")}
        timed("idioms")
        results["untouched"] = untouched(sharded, before)
        results["qlora"] = qlora(rank, mesh, global_batch, local)
        timed("qlora")
        results["mixed_precision"] = mixed_precision(rank, mesh, global_batch, local, sharded, reference)
        timed("mixed_precision")
        results["kinds"] = other_kinds(rank, mesh)
        timed("kinds")
        results["memory"] = memory(mesh)
        timed("memory")
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f, indent=1)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "variants")
