"""Strict everywhere: one test per class of bad input, each refused with a message naming what is wrong.

Files edited here get their checksum recomputed (`seal`), so that what is tested is the validation of the edit,
not the checksum (which is tested on its own: a flipped bit, an edited config).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
import typing

import optree
import pytest
import torch
from components import target_names_for, tiny_config
from conftest import NOT_IDENTITY_AT_INIT, assert_untouched, perturbed, qwen3_batch, snapshot, tiny_qwen3
from safetensors import safe_open
from safetensors.torch import save_file

import lora_func as lf
from lora_func import _config
from lora_func._serialize import checksum
from lora_func._variant import Intervention
from lora_func.variants import REGISTRY

Q = "model.layers.0.self_attn.q_proj"


# -- files ---------------------------------------------------------------------------------------------------------


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def write(path, tensors, metadata, *, seal=True):
    if seal and "sha256" in metadata:
        metadata = {**metadata, "sha256": checksum(metadata, tensors)}
    save_file(tensors, str(path), metadata=metadata)


def edit_config(path, edit):
    """Rewrite the stored config with `edit(fields)` applied to its fields."""
    metadata, tensors = read(path)
    fields = json.loads(metadata["config"])
    edit(fields)
    write(path, tensors, {**metadata, "config": json.dumps(fields)})


def edit_config_text(path, edit):
    """Rewrite the stored config's JSON text as `edit(text)` returns it."""
    metadata, tensors = read(path)
    write(path, tensors, {**metadata, "config": edit(metadata["config"])})


def edit_targets(path, edit):
    metadata, tensors = read(path)
    rows = json.loads(metadata["targets"])
    edit(rows)
    write(path, tensors, {**metadata, "targets": json.dumps(rows)})


@pytest.fixture
def saved(tmp_path):
    model = tiny_qwen3()
    params = perturbed(lf.init(model, lf.LoRAConfig(r=2, alpha=8, target_names=("q_proj", "v_proj")), seed=0))
    path = tmp_path / "adapter.safetensors"
    lf.save(params, path)
    return model, params, path


def assert_equal_params(a, b):
    assert a.config == b.config and a.targets == b.targets
    assert [(p, k) for p, k, _ in a.leaves()] == [(p, k) for p, k, _ in b.leaves()]
    for (_, _, x), (_, _, y) in zip(a.leaves(), b.leaves()):
        assert x.dtype == y.dtype and torch.equal(x.detach(), y.detach())


# -- load: the config in the metadata --------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["alpha", "use_rslora", "alpha_pattern", "dtype"])
def test_load_refuses_a_config_field_missing_instead_of_defaulting_it(saved, field):
    _, _, path = saved
    edit_config(path, lambda fields: fields.pop(field))
    with pytest.raises(lf.AdapterFileError, match=rf"lacks fields \['{field}'\] of LoRAConfig.*not given its default"):
        lf.load(path)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("use_rslora", "false", r"`use_rslora` must be a bool \(true or false\), got 'false'"),
        ("use_rslora", 1, r"`use_rslora` must be a bool \(true or false\), got 1"),
        ("r", True, r"`r` must be an int, got True"),
        ("r", 2.0, r"`r` must be an int, got 2.0"),
        ("alpha", "8", r"`alpha` must be a finite number, got '8'"),
        ("alpha", None, r"`alpha` must be a finite number, got None"),
        ("target_names", "q_proj", r"`target_names` must be a tuple of strings or None, got 'q_proj'"),
        ("target_names", [["q_proj"]], r"`target_names` must be a tuple of strings or None"),  # was: unhashable
        ("layers", [True], r"`layers` must be a tuple of ints or None"),
        ("rank_pattern", {"q_proj": 2}, r"`rank_pattern` must be a mapping of regex strings to ints"),  # lists only
        ("rank_pattern", [["q_proj", 2.5]], r"`rank_pattern` value for 'q_proj' must be an int, got 2.5"),
        ("alpha_pattern", [["q_proj"]], r"`alpha_pattern` must map regex strings to values"),
        ("dtype", "int8", r"`dtype` must be a torch floating dtype or its name \(a floating dtype\)"),
        ("exclude_names", None, r"`exclude_names` must be a tuple of strings, got None"),
    ],
)
def test_load_refuses_a_config_field_of_the_wrong_type(saved, field, value, message):
    _, _, path = saved
    edit_config(path, lambda fields: fields.update({field: value}))
    with pytest.raises(
        lf.AdapterFileError,
        match=rf"load: '.*adapter.safetensors': the stored config is invalid: "
        rf"LoRAConfig: {message}",
    ):
        lf.load(path)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_load_refuses_non_finite_numbers_in_the_config(saved, literal):
    _, _, path = saved
    edit_config_text(path, lambda text: text.replace('"alpha": 8.0', f'"alpha": {literal}'))
    with pytest.raises(lf.AdapterFileError, match=r"the stored config holds -?(nan|inf) at `alpha` \(JSON numbers"):
        lf.load(path)


def test_load_refuses_a_key_twice_in_the_config(saved):
    _, _, path = saved
    edit_config_text(path, lambda text: text[:-1] + ', "alpha": 16.0}')  # json.loads keeps the last
    with pytest.raises(lf.AdapterFileError, match=r"the stored config has the key 'alpha' twice"):
        lf.load(path)


# -- load: the targets in the metadata -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda rows: rows.append(dict(rows[0])), rf"stored target 4: the target '{Q}' is listed twice"),
        (lambda rows: rows[0].update(path="<shared>"), r"stored target 0: `path` must be a module path, not '<sh"),
        (lambda rows: rows[0].update(path=None), r"stored target 0: target field `path` must be a string"),
        (lambda rows: rows[0].update(roles=["reeder"]), r"stored target 0: target .*`roles` must be one of"),
        (lambda rows: rows[0].update(roles=["inner", "reader"]), r"`roles` must be one of"),
        (lambda rows: rows[0].update(roles="reader"), r"`roles` must be one of"),
        (lambda rows: rows[0].update(kind="Linear; rm -rf"), r"field `kind` must be one of \['block', 'conv'"),
        (lambda rows: rows[0].update(kind=7), r"field `kind` must be one of"),
        (lambda rows: rows[0].update(d_in=True), r"field `d_in` must be an int >= 1, got True"),
        (lambda rows: rows[0].update(d_in=0), r"field `d_in` must be an int >= 1, got 0"),
        (lambda rows: rows[0].update(d_out=64.0), r"field `d_out` must be an int >= 1, got 64.0"),
        (lambda rows: rows[0].pop("kind"), r"stored target 0: a stored target has missing fields \['kind'\]"),
        (lambda rows: rows[0].update(extra=1), r"stored target 0: a stored target has .*unknown fields \['extra'\]"),
        (lambda rows: rows.__setitem__(0, [Q, 64, 64]), r"stored target 0: a stored target is not a JSON object"),
        (lambda rows: rows.clear(), r"the stored target list is not a non-empty JSON list"),
    ],
    ids=lambda x: "" if callable(x) else None,
)
def test_load_refuses_malformed_targets(saved, edit, message):
    _, _, path = saved
    edit_targets(path, edit)
    with pytest.raises(lf.AdapterFileError, match=message):
        lf.load(path)


def test_load_refuses_a_target_shape_the_tensors_do_not_have(saved):
    _, _, path = saved
    edit_targets(path, lambda rows: rows[0].update(d_in=32))  # well-formed, but the stored A is (2, 64)
    with pytest.raises(lf.AdapterFileError, match=rf"key '{Q}.A' has shape \(2, 64\), expected \(2, 32\)"):
        lf.load(path)


# -- load: the safetensors header and the tensor data ----------------------------------------------------------------


def header_and_data(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + length].decode(), raw[8 + length :]


def assemble(header: str, data: bytes) -> bytes:
    encoded = header.encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data


def test_load_refuses_a_tensor_key_twice_in_the_header(saved):
    _, _, path = saved
    header, data = header_and_data(path)
    entries = json.loads(header)
    key = f"{Q}.A"
    duplicate = json.dumps({key: entries[key]})[1:-1]
    path.write_bytes(assemble("{" + duplicate + ", " + header[1:], data))  # safetensors would keep the last one
    with pytest.raises(lf.AdapterFileError, match=rf"the safetensors header has the key '{re.escape(key)}' twice"):
        lf.load(path)


def test_load_refuses_a_metadata_key_twice_in_the_header(saved):
    _, _, path = saved
    header, data = header_and_data(path)
    path.write_bytes(assemble(header.replace('"__metadata__":{', '"__metadata__":{"variant":"vera",', 1), data))
    with pytest.raises(lf.AdapterFileError, match=r"the safetensors header has the key 'variant' twice"):
        lf.load(path)


def test_one_flipped_bit_in_the_data_is_refused(saved):
    _, _, path = saved
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # the last tensor's data, a low mantissa bit: still a finite float
    path.write_bytes(bytes(raw))
    with pytest.raises(lf.AdapterFileError, match=r"its contents do not match the `sha256` in its metadata"):
        lf.load(path)


def test_an_edited_config_is_refused_by_the_checksum(saved):
    _, _, path = saved
    metadata, tensors = read(path)
    config = json.loads(metadata["config"])
    write(path, tensors, {**metadata, "config": json.dumps({**config, "alpha": 16.0})}, seal=False)
    with pytest.raises(lf.AdapterFileError, match=r"corrupted or edited after lf.save"):
        lf.load(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_load_refuses_non_finite_tensor_values(saved, value):
    _, _, path = saved
    metadata, tensors = read(path)
    tensors[f"{Q}.B"][0, 0] = value
    write(path, tensors, metadata)
    with pytest.raises(lf.AdapterFileError, match=rf"key '{Q}.B' holds NaN or infinite values"):
        lf.load(path)


def test_load_refuses_unknown_or_missing_metadata_entries(saved):
    _, _, path = saved
    metadata, tensors = read(path)
    write(path, tensors, {**metadata, "note": "hello"})
    with pytest.raises(lf.AdapterFileError, match=r"lacks \[\] and has unknown entries \['note'\]"):
        lf.load(path)
    write(path, tensors, {k: v for k, v in metadata.items() if k != "sha256"}, seal=False)
    with pytest.raises(lf.AdapterFileError, match=r"lacks \['sha256'\]"):
        lf.load(path)
    write(path, tensors, {**metadata, "sha256": "abc"}, seal=False)
    with pytest.raises(lf.AdapterFileError, match=r"its `sha256` is not a SHA-256 hex digest"):
        lf.load(path)


def test_format_version_1_is_refused_by_name_unless_allowed(saved):
    """Files of format "1" (no checksum) load only when asked, every other check still applying."""
    _, params, path = saved
    metadata, tensors = read(path)
    old = {k: v for k, v in metadata.items() if k != "sha256"} | {"format_version": "1"}
    write(path, tensors, old, seal=False)
    with pytest.raises(lf.AdapterFileError, match=r"format_version '1', written before .* checksum.*allow_unverified"):
        lf.load(path)
    assert_equal_params(lf.load(path, allow_unverified=True), params)
    write(path, tensors, {**old, "config": metadata["config"].replace('"use_rslora": false', '"use_rslora": 0')})
    with pytest.raises(lf.AdapterFileError, match=r"`use_rslora` must be a bool"):
        lf.load(path, allow_unverified=True)
    write(path, tensors, metadata)  # a checksum is checked even when unverified files are allowed
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(lf.AdapterFileError, match=r"do not match the `sha256`"):
        lf.load(path, allow_unverified=True)


def test_load_names_the_path_of_a_directory_or_a_missing_file(tmp_path):
    with pytest.raises(lf.AdapterFileError, match=rf"load: '{re.escape(str(tmp_path))}' is a directory"):
        lf.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"load: '.*absent.safetensors' does not exist"):
        lf.load(tmp_path / "absent.safetensors")


def test_save_replaces_a_file_whole_and_refuses_a_directory(saved, tmp_path):
    model, params, path = saved
    lf.save(params, path)  # over an existing file
    assert_equal_params(lf.load(path, model), params)
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors"]  # no partial file left behind
    with pytest.raises(ValueError, match=r"save: `path` .* is a directory"):
        lf.save(params, tmp_path)


def test_save_refuses_non_finite_leaves(saved, tmp_path):
    _, params, _ = saved
    entries = {p: dict(e) for p, e in params.items()}
    entries[Q]["A"] = entries[Q]["A"].detach().clone()
    entries[Q]["A"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"save: leaf {Q}.A holds NaN or infinite values"):
        lf.save(params.replace(entries), tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()


# -- config constructors: every field of every registered config, from its annotation --------------------------------


class Opaque:
    """A value of no config type, with a repr that is the same in every process (pytest-xdist compares test ids)."""

    def __repr__(self) -> str:
        return "Opaque()"


def bad_values(hint):
    """Values of the wrong type (or non-finite) for an annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, __import__("types").UnionType):
        return bad_values(next(a for a in args if a is not type(None)))
    if origin is tuple:
        return [1.5, {1, 2}, [Opaque()]]
    return {
        bool: ["false", 1, 0, None],
        int: [True, 2.5, "3", None],
        float: [float("nan"), float("inf"), True, "1.0", None],
        str: [1, None, ["road_1"]],
        torch.dtype: ["int8", torch.int64, 3],
    }[hint]


FIELDS = [
    (name, field, hint, value)
    for name, variant in sorted(REGISTRY.items())
    for field, hint in _config.field_types(variant.config).items()
    for value in bad_values(hint)
    if not (value is None and type(None) in typing.get_args(hint))
]


@pytest.mark.parametrize("name,field,hint,value", FIELDS, ids=[f"{n}-{f}-{v!r}" for n, f, _, v in FIELDS])
def test_every_config_field_refuses_values_of_the_wrong_type(name, field, hint, value):
    config = REGISTRY[name].config
    with pytest.raises(lf.ConfigError, match=rf"^{config.__name__}: (each of )?`{field}`"):
        config(**{field: value})


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_list_valued_fields_become_tuples_and_configs_hash(name):
    config = REGISTRY[name].config
    kwargs = dict(target_names=["q_proj", "v_proj"], exclude_names=["lm_head"], layers=[0, 1])
    pattern = [["q_proj", 4]] if name != "hra" else {"q_proj": 4}
    try:  # a method without a per-target rank refuses patterns (its own tests check the message)
        config(rank_pattern=pattern)
        kwargs["rank_pattern"] = pattern
    except ValueError as refused:
        assert "rank_pattern" in str(refused)
    cfg = config(**kwargs)
    assert cfg.target_names == ("q_proj", "v_proj") and cfg.layers == (0, 1) and cfg.exclude_names == ("lm_head",)
    assert hash(cfg) == hash(config(**kwargs))
    assert json.loads(_config.config_to_json(cfg))["target_names"] == ["q_proj", "v_proj"]


def test_config_constructors_refuse_non_finite_and_bool_numbers():
    with pytest.raises(lf.ConfigError, match=r"LoRAConfig: `alpha` must be a finite number \(not NaN or infinite\)"):
        lf.LoRAConfig(alpha=float("nan"))
    with pytest.raises(lf.ConfigError, match=r"`alpha_pattern` value for 'q_proj' must be a finite number"):
        lf.LoRAConfig(alpha_pattern={"q_proj": float("inf")})
    with pytest.raises(lf.ConfigError, match=r"`use_rslora` must be a bool"):
        lf.LoRAConfig(use_rslora="false")
    assert isinstance(lf.ConfigError("x"), ValueError) and isinstance(lf.ConfigError("x"), TypeError)
    assert lf.LoRAConfig(alpha=8).alpha == 8.0 and type(lf.LoRAConfig(alpha=8).alpha) is float


# -- from_peft -------------------------------------------------------------------------------------------------------


@pytest.fixture
def peft_dir(tmp_path):
    model = tiny_qwen3()
    params = perturbed(lf.init(model, lf.LoRAConfig(r=2, alpha=8, target_names=("q_proj", "v_proj")), seed=0))
    lf.to_peft(params, tmp_path, model=model)
    return model, params, tmp_path


def edit_peft_config(directory, edit):
    """`edit(fields)` mutates the fields, or returns the new JSON text (a str)."""
    path = directory / "adapter_config.json"
    fields = json.loads(path.read_text())
    text = edit(fields)
    path.write_text(text if isinstance(text, str) else json.dumps(fields))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda f: json.dumps(f).replace('"lora_alpha": 8', '"lora_alpha": NaN'), r"holds nan at `lora_alpha`"),
        (lambda f: json.dumps(f).replace('"lora_alpha": 8', '"lora_alpha": 1e999'), r"holds inf at `lora_alpha`"),
        (lambda f: json.dumps(f)[:-1] + ', "r": 4}', r"has the key 'r' twice"),
        (lambda f: f.update(lora_alpha="8"), r"`lora_alpha` is invalid: \"8\" \(must be a number\)"),
        (lambda f: f.update(lora_alpha=True), r"`lora_alpha` is invalid: true \(must be a number\)"),
        (lambda f: f.update(r=2.0), r"`r` is invalid: 2.0 \(must be a positive int\)"),
        (lambda f: f.update(r=True), r"`r` is invalid: true \(must be a positive int\)"),
        (lambda f: f.pop("lora_alpha") and None, r"`lora_alpha` is missing"),
        (lambda f: f.pop("target_modules") and None, r"`target_modules` is null"),
        (lambda f: f.update(use_rslora="false"), r"`use_rslora` must be true or false, got \"false\""),
        (lambda f: f.update(rank_pattern={"q_proj": "2"}), r"`rank_pattern` value for 'q_proj' is invalid"),
        (lambda f: f.update(rank_pattern=[2]), r"`rank_pattern` must be an object"),
        (lambda f: f.update(alpha_pattern={"q_proj": None}), r"`alpha_pattern` value for 'q_proj' is invalid"),
        (lambda f: f.update(target_modules="(q_proj"), r"`target_modules`=\"\(q_proj\" is not a regex"),
        (lambda f: f.update(target_modules=["q_proj", 3]), r"`target_modules` must be a regex string or a list"),
        (lambda f: f.update(exclude_modules=5), r"`exclude_modules` must be a regex string, a list of names or null"),
        (lambda f: f.update(exclude_modules="(x"), r"`exclude_modules`=\"\(x\" is not a regex"),
        (lambda f: f.update(layers_to_transform=[True]), r"`layers_to_transform` must be an int or a list of ints"),
        (lambda f: f.update(layers_to_transform=[0], layers_pattern=7), r"`layers_pattern` must be"),
        (lambda f: f.update(peft_type=["LORA"]), r"`peft_type`=\[\"LORA\"\] is not one lora_func reads"),
        (lambda f: "[1, 2]", r"is not a JSON object"),
    ],
    ids=lambda x: "" if callable(x) else None,
)
def test_from_peft_refuses_bad_config_fields_naming_file_and_field(peft_dir, edit, message):
    model, _, directory = peft_dir
    edit_peft_config(directory, edit)
    with pytest.raises(lf.AdapterFileError, match=rf"from_peft: '.*adapter_config.json'.*{message}"):
        lf.from_peft(directory, model)


def test_from_peft_refuses_a_key_twice_in_the_tensor_header_and_nan_tensors(peft_dir):
    model, _, directory = peft_dir
    path = directory / "adapter_model.safetensors"
    good = path.read_bytes()
    header, data = header_and_data(path)
    key = f"base_model.model.{Q}.lora_A.weight"
    duplicate = json.dumps({key: json.loads(header)[key]})[1:-1]
    path.write_bytes(assemble("{" + duplicate + ", " + header[1:], data))
    with pytest.raises(
        lf.AdapterFileError, match=rf"adapter_model.safetensors' .*has the key '{re.escape(key)}' twice"
    ):
        lf.from_peft(directory, model)
    path.write_bytes(good)
    _, tensors = read(path)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(lf.AdapterFileError, match=rf"adapter_model.safetensors' key '{re.escape(key)}' holds NaN"):
        lf.from_peft(directory, model)


# -- the structure check, at every entry point (invariant 12) --------------------------------------------------------


def _defect(kind, params):
    entries = {p: dict(e) for p, e in params.items()}
    if kind == "leaf-missing":
        del entries[Q]["B"]
    elif kind == "leaf-extra":
        entries[Q]["C"] = torch.zeros(2)
    elif kind == "shape":
        entries[Q]["B"] = torch.zeros(5, 5)
    elif kind == "dtype":
        entries[Q]["A"] = entries[Q]["A"].double()
    elif kind == "not-a-tensor":
        entries[Q]["A"] = entries[Q]["A"].tolist()
    elif kind == "entry-missing":
        del entries[Q]
    elif kind == "target-twice":
        return lf.Params(entries, params.config, params.targets + params.targets[:1])
    elif kind == "devices-split":
        entries[Q]["A"] = entries[Q]["A"].to("meta")
    elif kind == "trainable-half":
        return lf.split(params)[0]
    elif kind == "frozen-half":
        return lf.split(params)[1]
    elif kind == "stacked":
        return lf.stack([params, params])
    return params.replace(entries)


DEFECTS = {
    "leaf-missing": rf"leaf {Q}\.B is missing; its variant declares \['A', 'B', 'lambda', 'w_norm'\]",
    "leaf-extra": rf"`params` has a leaf {Q}\.C that its variant does not declare",
    "shape": rf"leaf {Q}\.B has shape \(5, 5\); its variant declares \(64, 2\)",
    "dtype": rf"leaf {Q}\.A has dtype torch.float64, the config says torch.float32",
    "not-a-tensor": rf"leaf {Q}\.A is a list, not a torch.Tensor",
    "entry-missing": rf"none for \['{Q}'\]",
    "target-twice": rf"lists the target '{Q}' twice",
    "devices-split": rf"leaf {Q}\.B is on cpu and leaf {Q}\.A on meta; the leaves of one target sit on one device",
    "trainable-half": r"`params` is the trainable half of lf.split .*needs a whole adapter: lf.combine",
    "frozen-half": r"`params` is the frozen half of lf.split",
    "stacked": r"`params` stacks 2 adapters",
}


def _token_losses(out):
    logits, labels = out.logits[:, :-1], qwen3_batch()["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)


ENTRY_POINTS = {
    "apply": lambda model, p, tmp: lf.apply(model, p, qwen3_batch()),
    "merge": lambda model, p, tmp: lf.merge(model, p),
    "save": lambda model, p, tmp: lf.save(p, tmp / "out.safetensors"),
    "to_peft": lambda model, p, tmp: lf.to_peft(p, tmp / "peft"),
    "per_example_grads": lambda model, p, tmp: lf.per_example_grads(model, p, qwen3_batch(), _token_losses),
    "stack": lambda model, p, tmp: lf.stack([p, p]),
}
# What an entry point accepts by design: `stack` stacks split halves; apply runs a stack (with vmap or ids).
ACCEPTS = {("stack", "trainable-half"), ("stack", "frozen-half")}


@pytest.mark.parametrize("defect", list(DEFECTS))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_checks_the_structure_before_anything_runs(entry, defect, tmp_path):
    model = tiny_qwen3()
    params = perturbed(lf.init(model, lf.DeLoRAConfig(r=2, target_names=("q_proj", "v_proj")), seed=0))
    bad = _defect(defect, params)
    before = snapshot(model)
    if (entry, defect) in ACCEPTS:
        ENTRY_POINTS[entry](model, bad, tmp_path)
        return
    message = DEFECTS[defect]
    if entry == "stack":
        message = message.replace("`params`", r"`adapters\[0\]`")
    if entry in ("save", "to_peft") and defect == "devices-split":  # these need values: meta holds none
        message = rf"leaf {Q}\.A is on the meta device, which holds no values to {entry}"
    if entry == "apply" and defect == "stacked":
        message = r"`params` stacks 2 adapters \(a leading dimension of 2 on every leaf\)"
    with pytest.raises(ValueError, match=rf"^{entry}: .*{message}"):
        ENTRY_POINTS[entry](model, bad, tmp_path)
    assert_untouched(model, before)
    assert os.listdir(tmp_path) == []  # nothing written


def test_unstack_checks_the_structure(tmp_path):
    model = tiny_qwen3()
    stacked = lf.stack([lf.init(model, lf.DeLoRAConfig(r=2, target_names=("q_proj",)), seed=s) for s in range(2)])
    entries = {p: dict(e) for p, e in stacked.items()}
    del entries[Q]["B"]
    with pytest.raises(ValueError, match=rf"unstack: leaf {Q}\.B is missing"):
        lf.unstack(stacked.replace(entries))
    halves = [lf.unstack(h) for h in lf.split(stacked)]  # halves unstack, e.g. per-example gradients
    assert len(halves[0]) == len(halves[1]) == 2
    assert set(halves[0][0][Q]) == {"A", "B", "lambda"} and set(halves[1][0][Q]) == {"w_norm"}


def test_save_and_to_peft_refuse_leaves_without_values(tmp_path):
    model = tiny_qwen3()
    params = lf.init(model, lf.LoRAConfig(r=2, target_names=("q_proj",)), seed=0)
    on_meta = optree.tree_map(lambda t: t.to("meta"), params)
    with pytest.raises(ValueError, match=rf"save: leaf {Q}\.A is on the meta device, which holds no values"):
        lf.save(on_meta, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=rf"to_peft: leaf {Q}\.A is on the meta device"):
        lf.to_peft(on_meta, tmp_path / "peft")
    assert os.listdir(tmp_path) == []


# -- devices --------------------------------------------------------------------------------------------------------


def test_merge_names_the_target_whose_leaves_are_on_another_device():
    model = tiny_qwen3()
    params = lf.init(model, lf.LoRAConfig(r=2, target_names=("q_proj",)), seed=0)
    on_meta = optree.tree_map(lambda t: t.to("meta"), params)
    with pytest.raises(ValueError, match=rf"merge: the leaves of target '{Q}' are on meta, its module's weight on cpu"):
        lf.merge(model, on_meta)


def test_apply_names_the_target_whose_leaves_are_on_another_device():
    model = tiny_qwen3()
    params = lf.init(model, lf.LoRAConfig(r=2, target_names=("q_proj",)), seed=0)
    on_meta = optree.tree_map(lambda t: t.to("meta"), params)
    with pytest.raises(ValueError, match=rf"apply: the leaves of target '{Q}' are on meta"):
        lf.apply(model, on_meta, qwen3_batch())


# -- dtypes: every variant supports the dtypes its init accepts -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_variant_runs_in_the_half_dtypes_its_init_accepts(name, dtype):
    model = tiny_qwen3()
    batch = qwen3_batch()
    variant = REGISTRY[name]
    kwargs = {"calibration_data": [batch]} if variant.calibrated else {}
    names = target_names_for(variant, ("q_proj", "down_proj"))  # None for ReFT: its blocks, by `layers`
    cfg = tiny_config(variant.name, r=4, dtype=dtype, **({"target_names": names} if names else {}))
    params = lf.init(model, cfg, seed=0, **kwargs)
    assert all(t.dtype == dtype for _, _, t in params.leaves())
    with torch.no_grad():
        base = model(**batch).logits
    out = lf.apply(model, params, batch)
    assert torch.isfinite(out.logits).all()
    if name not in NOT_IDENTITY_AT_INIT:
        torch.testing.assert_close(out.logits, base, rtol=0, atol=1e-2)  # identity at init, to the leaves' rounding
    moved = perturbed(params, seed=1)
    loss = lf.apply(model, moved, batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    for leaf in lf.trainable_leaves(moved):
        assert leaf.grad is not None and leaf.grad.dtype == dtype and torch.isfinite(leaf.grad).all()
    if variant.capability(Intervention) is not None:  # no weight form
        return
    merged = lf.merge(model, moved)
    with torch.no_grad():
        folded = torch.func.functional_call(model, merged, (), batch).logits
        unmerged = lf.apply(model, moved, batch).logits
    assert math.isfinite(folded.abs().max().item())
    torch.testing.assert_close(folded, unmerged, rtol=0, atol=5e-2)


def test_json_forms_round_trip_for_every_registered_config():
    for name, variant in REGISTRY.items():
        cfg = variant.config()
        text = _config.config_to_json(cfg)
        assert _config.config_from_json(variant.config, text, where="test") == cfg, name
        assert dataclasses.asdict(cfg).keys() == json.loads(text).keys()
