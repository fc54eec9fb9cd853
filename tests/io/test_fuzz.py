"""Property-based fuzzing of `lf.load` and `lf.from_peft` (hypothesis, derandomized: the same examples every run).

The properties:
- bytes of a valid adapter file mutated (bits flipped, bytes set, inserted, deleted, the file cut): `load` either
  refuses it with an `lf.AdapterFileError` naming the file, or loads an adapter bitwise equal to the original;
  never another adapter, never another exception;
- random JSON in each metadata entry, config field and target field (checksum recomputed, so that validation is
  what stands in the way): refused as above, or loaded as exactly what the file states (no silent default or
  conversion: a JSON 1 is never a bool, a missing field never a default);
- the same for `from_peft`, on the two files of a PEFT checkpoint (which has no checksum: where mutated data
  loads, it loads with the stated config and the file's own tensors).

Set LORA_FUNC_FUZZ_REPORT=path to write the counts (examples, refused, loaded) as JSON.
"""

from __future__ import annotations

import collections
import json
import os
import struct
import warnings

import pytest
import torch
from conftest import perturbed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lora_func as lf
from lora_func import _config
from lora_func._serialize import checksum
from lora_func.kinds import target_to_json

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
STATS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    lines = [f"{name}: {dict(counts)}" for name, counts in sorted(STATS.items())]
    print("\nfuzz counts\n" + "\n".join(lines))
    if os.environ.get("LORA_FUNC_FUZZ_REPORT"):
        with open(os.environ["LORA_FUNC_FUZZ_REPORT"], "w") as f:
            json.dump({name: dict(counts) for name, counts in STATS.items()}, f, indent=2, sort_keys=True)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 8))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


ADAPTERS = {
    "lora": lambda: lf.LoRAConfig(r=2, alpha=4, use_rslora=True, rank_pattern={"2": 1}),
    "vera": lambda: lf.VeRAConfig(r=2, d_initial=0.5),  # a shared entry
}


@pytest.fixture(scope="module", params=list(ADAPTERS))
def adapter(request, workdir):
    params = perturbed(lf.init(small_model(), ADAPTERS[request.param](), seed=0))
    path = workdir / f"{request.param}.safetensors"
    lf.save(params, path)
    return request.param, params, path.read_bytes()


def assert_same_adapter(loaded: lf.Params, original: lf.Params) -> None:
    assert loaded.config == original.config and loaded.targets == original.targets
    assert [(p, k) for p, k, _ in loaded.leaves()] == [(p, k) for p, k, _ in original.leaves()]
    for (_, _, a), (_, _, b) in zip(loaded.leaves(), original.leaves()):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b.detach())


def refused_or(call, path, counts):
    """`call()`, or None where it raised lora_func's own error naming `path`; any other exception fails the test."""
    try:
        result = call()
    except lf.AdapterFileError as e:
        assert str(path) in str(e), f"the error does not name the file: {e}"
        counts["refused"] += 1
        return None
    counts["loaded"] += 1
    return result


# -- byte mutations ----------------------------------------------------------------------------------------------

mutation = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "cut"]),
    st.sampled_from(["length", "header", "data"]),
    st.floats(0, 1, exclude_max=True),
    st.integers(0, 255),
)


def mutate(data: bytes, mutations) -> tuple[bytes, bool]:
    """The mutated bytes, and whether every mutation left the tensor data region alone."""
    out = bytearray(data)
    (length,) = struct.unpack("<Q", data[:8])
    header_only = True
    for kind, region, where, value in mutations:
        start, stop = {"length": (0, 8), "header": (8, 8 + length), "data": (8 + length, len(out))}[region]
        stop = min(stop, len(out))
        if stop <= start:
            continue
        i = start + int(where * (stop - start))
        header_only &= region != "data"
        if kind == "flip":
            out[i] ^= 1 << (value % 8)
        elif kind == "set":
            out[i] = value
        elif kind == "insert":
            out.insert(i, value)
        elif kind == "delete":
            del out[i]
        else:
            del out[i:]
    return bytes(out), header_only


@settings(max_examples=120, **SETTINGS)
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_load_of_mutated_bytes_refuses_or_loads_the_same_adapter(adapter, workdir, mutations):
    name, original, data = adapter
    path = workdir / f"mutated-{name}.safetensors"
    path.write_bytes(mutate(data, mutations)[0])
    counts = STATS[f"load, byte mutations ({name})"]
    counts["examples"] += 1
    loaded = refused_or(lambda: lf.load(path), path, counts)
    if loaded is not None:
        assert_same_adapter(loaded, original)


# -- random JSON in the metadata -----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from([0, 1, 2, -1, 1.0, 2.0, 4.0, "", "float32", "bfloat16", "lora", "reader", "Linear", "0", "2"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)


def same(stated, canonical) -> bool:
    """`stated` is exactly `canonical` as JSON: types and values, a bool never an int; an int only stands for the
    equal float (`alpha: 4` for 4.0)."""
    if isinstance(stated, bool) or isinstance(canonical, bool):
        return type(stated) is type(canonical) and stated == canonical
    if isinstance(canonical, float) and isinstance(stated, int):
        return float(stated) == canonical
    if isinstance(canonical, list):
        return isinstance(stated, list) and len(stated) == len(canonical) and all(map(same, stated, canonical))
    if isinstance(canonical, dict):
        return (
            isinstance(stated, dict)
            and stated.keys() == canonical.keys()
            and all(same(stated[k], canonical[k]) for k in canonical)
        )
    return type(stated) is type(canonical) and stated == canonical


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


edit = st.tuples(
    st.sampled_from(["entry", "config", "target"]),
    st.sampled_from(
        ["format", "format_version", "library_version", "variant", "config", "targets", "sha256"]
        + ["r", "alpha", "dtype", "target_roles", "target_names", "exclude_names", "layers", "rank_pattern"]
        + ["alpha_pattern", "use_rslora", "d_initial", "projection_prng_key", "path", "d_in", "d_out", "roles", "kind"]
        + ["unknown"]
    ),
    st.one_of(st.just("delete"), json_values),
    st.booleans(),
)


@settings(max_examples=150, **SETTINGS)
@given(edits=st.lists(edit, min_size=1, max_size=2))
def test_load_of_random_json_in_the_metadata_refuses_or_loads_what_it_states(adapter, workdir, edits):
    name, original, data = adapter
    good = workdir / f"{name}.safetensors"
    metadata, tensors = read(good)
    sealed = edits[0][3]  # else the checksum is left stale: then only the original may load
    for where, key, value, as_text in edits:
        if where == "entry":
            if value == "delete":
                metadata.pop(key, None)
            else:
                metadata[key] = value if isinstance(value, str) and as_text else json.dumps(value)
        elif where == "config" and "config" in metadata:
            try:
                fields = json.loads(metadata["config"])
            except ValueError:
                continue
            if isinstance(fields, dict):
                fields.pop(key, None) if value == "delete" else fields.__setitem__(key, value)
                metadata["config"] = json.dumps(fields)
        elif where == "target" and "targets" in metadata:
            try:
                rows = json.loads(metadata["targets"])
            except ValueError:
                continue
            if isinstance(rows, list) and rows and isinstance(rows[-1], dict):
                rows[-1].pop(key, None) if value == "delete" else rows[-1].__setitem__(key, value)
                metadata["targets"] = json.dumps(rows)
    if sealed and "sha256" in metadata:
        metadata["sha256"] = checksum(metadata, tensors)
    path = workdir / f"edited-{name}.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # safetensors' own serializer may warn on odd metadata
        save_file(tensors, str(path), metadata=metadata)
    counts = STATS[f"load, random JSON in the metadata ({name})"]
    counts["examples"] += 1
    loaded = refused_or(lambda: lf.load(path), path, counts)
    if loaded is None:
        return
    # Loaded as exactly what the file states: variant, every config field, every target, the tensors.
    assert metadata["variant"] == name
    assert same(json.loads(metadata["config"]), json.loads(_config.config_to_json(loaded.config)))
    assert same(json.loads(metadata["targets"]), [target_to_json(t) for t in loaded.targets])
    for p, leaf, t in loaded.leaves():
        assert torch.equal(t, tensors[f"{p}.{leaf}"])
    if not sealed:
        assert_same_adapter(loaded, original)


# -- from_peft -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_checkpoint(workdir):
    model = small_model()
    params = perturbed(lf.init(model, lf.LoRAConfig(r=2, alpha=4, rank_pattern={"2": 1}), seed=0))
    directory = workdir / "peft"
    lf.to_peft(params, directory, model=model)
    return model, params, directory


def copy_checkpoint(directory, target, config: bytes | None = None, weights: bytes | None = None):
    target.mkdir(exist_ok=True)
    (target / "adapter_config.json").write_bytes(config or (directory / "adapter_config.json").read_bytes())
    (target / "adapter_model.safetensors").write_bytes(
        weights or (directory / "adapter_model.safetensors").read_bytes()
    )


def assert_as_stated(loaded: lf.Params, fields: dict, original: lf.Params, tensors_equal: bool) -> None:
    """What `from_peft` loaded is what the config states, with the file's tensors."""
    cfg = loaded.config
    assert isinstance(fields.get("r"), int) and not isinstance(fields["r"], bool)
    assert cfg.r == fields["r"] and cfg.alpha == float(fields["lora_alpha"])
    assert cfg.use_rslora is fields.get("use_rslora", False)
    assert dict(cfg.rank_pattern) == (fields.get("rank_pattern") or {})
    assert [t.path for t in loaded.targets] == [t.path for t in original.targets]
    for p, leaf, t in loaded.leaves():
        assert t.shape == original[p][leaf].shape and torch.isfinite(t).all()
        if tensors_equal:
            assert torch.equal(t, original[p][leaf].detach())


peft_edit = st.tuples(
    st.sampled_from(
        ["peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"]
        + ["rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "bias", "modules_to_save", "fan_in_fan_out"]
        + ["init_lora_weights", "lora_dropout", "task_type", "inference_mode", "megatron_config", "unknown_field"]
    ),
    st.one_of(st.just("delete"), json_values),
)


@settings(max_examples=120, **SETTINGS)
@given(edits=st.lists(peft_edit, min_size=1, max_size=2))
def test_from_peft_of_random_json_in_the_config_refuses_or_loads_what_it_states(peft_checkpoint, workdir, edits):
    model, original, directory = peft_checkpoint
    fields = json.loads((directory / "adapter_config.json").read_text())
    for key, value in edits:
        fields.pop(key, None) if value == "delete" else fields.__setitem__(key, value)
    target = workdir / "peft-json"
    copy_checkpoint(directory, target, config=json.dumps(fields).encode())
    counts = STATS["from_peft, random JSON in adapter_config.json"]
    counts["examples"] += 1
    loaded = refused_or(lambda: lf.from_peft(target, model), target, counts)
    if loaded is not None:
        assert_as_stated(loaded, fields, original, tensors_equal=True)


@settings(max_examples=100, **SETTINGS)
@given(mutations=st.lists(mutation, min_size=1, max_size=3), in_config=st.booleans())
def test_from_peft_of_mutated_bytes_refuses_or_loads_what_the_files_state(
    peft_checkpoint, workdir, mutations, in_config
):
    model, original, directory = peft_checkpoint
    target = workdir / "peft-bytes"
    config = (directory / "adapter_config.json").read_bytes()
    weights = (directory / "adapter_model.safetensors").read_bytes()
    header_only = True
    if in_config:  # the JSON has no length prefix: mutate it as one "header" region
        config = mutate(struct.pack("<Q", len(config)) + config, mutations)[0][8:] or b" "
    else:
        weights, header_only = mutate(weights, mutations)
    copy_checkpoint(directory, target, config=config, weights=weights)
    counts = STATS["from_peft, byte mutations"]
    counts["examples"] += 1
    loaded = refused_or(lambda: lf.from_peft(target, model), target, counts)
    if loaded is not None:
        assert_as_stated(loaded, json.loads(config), original, tensors_equal=header_only)
