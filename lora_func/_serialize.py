"""`save` / `load`: safetensors with the config, targets, versions and a checksum in the metadata; loading is strict.

The file (format_version "2"):
- tensors `<module path>.<leaf>` (shared leaves `<shared>.<leaf>`), contiguous, in the config's dtype, finite;
- metadata, all strings: `format` ("lora_func"), `format_version`, `library_version`, `variant`, `config`
  (`config_to_json`: every field), `targets` (a JSON list of `{path, d_in, d_out, roles, kind}`), `sha256`.
- `sha256` is the hex SHA-256 of a sequence of items, each written as its length (8 bytes, little-endian) then
  its bytes: for every other metadata entry, sorted by key, its key and its value (UTF-8); then for every tensor,
  sorted by key, its key, its dtype (torch's name, e.g. "bfloat16"), its shape (decimal, comma-separated) and its
  raw data (C order, little-endian, as safetensors stores it). It covers the config and targets as well as the
  data: safetensors has no checksum, and a file whose bytes changed after `save` must not load as another adapter.

`load` reads the safetensors header itself before safetensors does (8-byte little-endian length, then JSON), so
that a key given twice is refused (safetensors, and Python's json, keep the last one). Then, in order: the format
and version, the metadata keys, the variant, the config (every field present, of its exact type, finite), the
targets (unique, well-formed), with `model` that every target exists there with its shape, the tensor keys,
shapes, dtypes and values, and last the checksum (so that an edit the checks above can name is named). Every
refusal is an `AdapterFileError` naming the file and what is wrong.

Versions. "1" (lora_func 0.1.0) is "2" without `sha256`: such files are refused by name, or read with
`allow_unverified=True`, every other check applying. A config field added to a config class later is added to
`SINCE` with the format version that introduced it, and the version is bumped: files of older versions lack it
and take its default (what they were trained with), newer files must hold it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ._config import AdapterConfig, config_from_json, config_to_json, strict_json
from ._init import assemble
from ._kind import Target
from ._params import SHARED, Params
from ._structure import check, declared_shapes, fits, growing_dims
from ._version import __version__
from .kinds import locate, refuse_offloaded, target_from_json, target_to_json
from .variants import REGISTRY, variant_for

FORMAT = "lora_func"
FORMAT_VERSION = "2"
READS = ("1", "2")
CHECKSUM = "sha256"
METADATA_KEYS = ("format", "format_version", "library_version", "variant", "config", "targets")
# Config field -> the format version that introduced it; a field not listed has been in every version.
SINCE: dict[str, str] = {}
MAX_HEADER = 100_000_000  # bytes; safetensors' own limit


class AdapterFileError(ValueError):
    """`load` / `from_peft`: the file is not a valid adapter; the message names the file and what is wrong."""


def save(params: Params, path: str | os.PathLike) -> None:
    """Write `params` to a safetensors file: keys `<module path>.<leaf>`; config, targets and a SHA-256 of it all
    in the metadata. What `load` would refuse is not written (a leaf missing, a stacked or split adapter, NaN).

    >>> lf.save(params, "adapter.safetensors")
    """
    check(params, "save", stacked=False, values=True)
    variant = variant_for(params.config, caller="save")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"save: `path` {path!r} is a directory; give a file name (adapter.safetensors)")
    tensors = {}
    for p, leaf, t in params.leaves():
        t = t.detach().to("cpu").contiguous()
        if not torch.isfinite(t).all():
            raise ValueError(f"save: leaf {p}.{leaf} holds NaN or infinite values; lf.load would refuse the file")
        tensors[f"{p}.{leaf}"] = t
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "variant": variant.name,
        "config": config_to_json(params.config),
        "targets": json.dumps([target_to_json(t) for t in params.targets]),
    }
    metadata[CHECKSUM] = checksum(metadata, tensors)
    # Written next to `path`, then moved over it: an interrupted save leaves the old file as it was.
    folder = os.path.dirname(os.path.abspath(path))
    handle, partial = tempfile.mkstemp(dir=folder, prefix=".lora_func-", suffix=".partial")
    os.close(handle)
    try:
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def checksum(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """The `sha256` entry of a file with this metadata (less `sha256`) and these tensors; see the module docstring."""
    digest = hashlib.sha256()

    def item(data: bytes) -> None:
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    for key in sorted(k for k in metadata if k != CHECKSUM):
        item(key.encode())
        item(metadata[key].encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        item(key.encode())
        item(str(tensor.dtype).removeprefix("torch.").encode())
        item(",".join(map(str, tensor.shape)).encode())
        item(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_safetensors(path: str, where: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a safetensors file, refusing a header that lists a key twice.

    safetensors' format: 8 bytes (little-endian u64) of header length, a JSON header `{key: {dtype, shape,
    data_offsets}, "__metadata__": {str: str}}`, the data. The header is parsed here first, strictly (see
    `strict_json`); then safetensors reads the file and checks its own rules (offsets, sizes, dtypes).
    """
    if os.path.isdir(path):
        raise AdapterFileError(f"{where} is a directory, not a safetensors file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where} does not exist")

    def invalid(why: str) -> AdapterFileError:
        return AdapterFileError(f"{where} is not a valid safetensors file ({why})")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise invalid(f"{size} bytes, fewer than the 8 of the header length")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, MAX_HEADER):
            raise invalid(f"a header length of {length} bytes, and the file has {size}")
        raw = f.read(length)
    try:
        header = strict_json(raw.decode("utf-8"), "the safetensors header")
    except UnicodeDecodeError as e:
        raise invalid(f"its header is not UTF-8: {e}") from None
    except ValueError as e:
        raise invalid(str(e)) from None
    if not isinstance(header, dict):
        raise invalid("its header is not a JSON object")
    stored = header.get("__metadata__")
    if stored is not None and not (isinstance(stored, dict) and all(isinstance(v, str) for v in stored.values())):
        raise invalid("its `__metadata__` is not an object of strings")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors' errors on a malformed file: SafetensorError, and others for odd dtypes
        raise invalid(f"{type(e).__name__}: {e}") from None
    return dict(metadata), tensors


def _parse_targets(text: str, where: str, version: str) -> tuple[Target, ...]:
    """The stored target list: a non-empty JSON list of objects with exactly Target's fields, each well-formed,
    no path twice. Format "1" stored only linear-like targets, with the module's class name as `kind`."""
    try:
        rows = strict_json(text, "the stored target list")
    except ValueError as e:
        raise AdapterFileError(f"{where}: {e}") from None
    if not isinstance(rows, list) or not rows:
        raise AdapterFileError(f"{where}: the stored target list is not a non-empty JSON list")
    found: list[Target] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        at = f"{where}: stored target {i}"
        if version == "1" and isinstance(row, dict) and set(row) == {"path", "d_in", "d_out", "roles", "kind"}:
            row = {**row, "kind": "linear", "module": row["kind"], "layout": {}}
        try:
            target = target_from_json(row, at)  # every field, as its kind defines them
        except ValueError as e:
            raise AdapterFileError(str(e)) from None
        if target.path == SHARED:
            raise AdapterFileError(f"{at}: `path` must be a module path, not {SHARED!r}")
        if target.path in seen:
            raise AdapterFileError(f"{at}: the target {target.path!r} is listed twice")
        seen.add(target.path)
        found.append(target)
    return tuple(found)


def check_model(model: nn.Module, found: tuple[Target, ...], caller: str) -> None:
    """Every target exists in `model` as the kind and shape it was built for (`lora_func.kinds.locate`), and the
    model is not offloaded."""
    refuse_offloaded(model, caller)
    for target in found:
        locate(model, target, caller)


def _added_fields(cls: type[AdapterConfig], version: str) -> dict[str, Any]:
    """Fields of `cls` that files of format `version` predate, with the default they take."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name in SINCE and int(SINCE[f.name]) > int(version)}


def load(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    config: AdapterConfig | type[AdapterConfig] | None = None,
    allow_unverified: bool = False,
) -> Params:
    """Read an adapter written by `save`, validating everything: the checksum, the config, the targets, every key,
    shape, dtype and value. A refusal is an `lf.AdapterFileError` naming the file and what is wrong.

    With `model`, every target must exist there with the same shape, and leaves are moved to its
    device. With `config` (an instance or a config class), the stored config must match it.
    `allow_unverified=True` also reads files of format version "1", written before files carried a checksum
    (every other check still applies; `lf.save` them again to add one).

    >>> params = lf.load("adapter.safetensors", model)
    """
    path = os.fspath(path)
    where = f"load: {path!r}"
    if not isinstance(allow_unverified, bool):
        raise TypeError(f"load: `allow_unverified` must be a bool, got {allow_unverified!r}")
    metadata, tensors = read_safetensors(path, where)
    if metadata.get("format") != FORMAT:
        raise AdapterFileError(f"{where} is a safetensors file but not a lora_func adapter (no lora_func metadata)")
    version = metadata.get("format_version")
    if version not in READS:
        raise AdapterFileError(f"{where} has format_version {version!r}; this library reads {READS}")
    keys = METADATA_KEYS if version == "1" else (*METADATA_KEYS, CHECKSUM)
    unknown = sorted(set(metadata) - set(keys))
    missing = [k for k in keys if k not in metadata]
    if unknown or missing:
        raise AdapterFileError(
            f"{where}: its metadata lacks {missing} and has unknown entries {unknown}; format_version "
            f"{version!r} holds exactly {list(keys)}"
        )
    if version == "1" and not allow_unverified:
        raise AdapterFileError(
            f"{where} has format_version '1', written before adapter files carried a checksum, so its contents "
            "cannot be verified; read it with lf.load(..., allow_unverified=True) (every other check still "
            "applies), then lf.save it to add one"
        )
    if version != "1" and not re.fullmatch(r"[0-9a-f]{64}", metadata[CHECKSUM]):
        raise AdapterFileError(f"{where}: its `{CHECKSUM}` is not a SHA-256 hex digest: {metadata[CHECKSUM]!r:.80}")

    name = metadata["variant"]
    if name not in REGISTRY:
        raise AdapterFileError(f"{where} holds variant {name!r}, which is not one of {sorted(REGISTRY)}")
    variant = REGISTRY[name]
    try:
        added = _added_fields(variant.config, version)
        cfg = config_from_json(variant.config, metadata["config"], where=where, added=added)
    except ValueError as e:
        raise AdapterFileError(str(e)) from None
    if isinstance(config, type) and config is not type(cfg) or isinstance(config, AdapterConfig) and config != cfg:
        want = config.__name__ if isinstance(config, type) else repr(config)
        raise AdapterFileError(f"{where} holds {cfg!r}, expected {want}")
    found = _parse_targets(metadata["targets"], where, version)
    if model is not None:
        try:
            check_model(model, found, where)
        except ValueError as e:
            raise AdapterFileError(str(e)) from None

    try:
        declared = declared_shapes(cfg, found, "load")
    except ValueError as e:  # a rank the stored shapes cannot hold
        raise AdapterFileError(f"{where}: {e}") from None
    grows = growing_dims(cfg, found)
    shapes = {
        f"{p}.{leaf}": (shape, grows.get(leaf, ()) if p == SHARED else ())
        for p, entry in declared.items()
        for leaf, shape in entry.items()
    }
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise AdapterFileError(f"{where} has missing keys {missing[:5]} and unexpected keys {unexpected[:5]}")
    for key, (shape, larger) in shapes.items():
        tensor = tensors[key]
        if not fits(tuple(tensor.shape), shape, larger):
            raise AdapterFileError(f"{where} key {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
        if tensor.dtype != cfg.dtype:
            raise AdapterFileError(f"{where} key {key!r} has dtype {tensor.dtype}, the config says {cfg.dtype}")
        if not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{where} key {key!r} holds NaN or infinite values")
    # Last: every check above names what is wrong with an edited file; this one catches any other change.
    if version != "1" and checksum(metadata, tensors) != metadata[CHECKSUM]:
        raise AdapterFileError(
            f"{where}: its contents do not match the `{CHECKSUM}` in its metadata: the file was corrupted or "
            "edited after lf.save"
        )

    entries = {entry: {leaf: tensors[f"{entry}.{leaf}"] for leaf in leaves} for entry, leaves in declared.items()}
    return assemble(cfg, found, entries, model, "load")
