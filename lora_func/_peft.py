"""`to_peft` / `from_peft`: exchange with Hugging Face PEFT's `adapter_model.safetensors` + `adapter_config.json`.

PEFT is not imported: both files are written and read directly, in the layout `PeftModel.save_pretrained`
produces (tensor keys `base_model.model.<module path>.<PEFT name>`, config JSON with `indent=2, sort_keys=True`).

One entry of `METHODS` per method: the lora_func variant, PEFT's `peft_type`, leaf <-> tensor names, the
PEFT config fields and what each may hold, and the translations both ways. Adding a method is one entry.

Reading is as strict as `lf.load` (PEFT itself loads leniently): every config field is either translated,
inert (no effect on the adapted function, e.g. `lora_dropout`), or must hold its default; a field lora_func
does not know is refused unless it is unset (null, false, empty). The modules PEFT would adapt are computed
with PEFT's own matching rules, must all be linear-like, and must be exactly the modules the tensor file
holds; shapes and dtypes are checked against the model.

PiSSA. PEFT rewrites the base weight to W − s·B0A0 and saves A, B. lora_func keeps W and computes
y + s·(BA − B0A0)x, which is exactly a rank-2r LoRA with A' = [A; A0], B' = [B, −B0]. `to_peft` writes
that LoRA (r and alpha doubled, rsLoRA alpha times √2, patterns likewise): PEFT's own export convention
(`save_pretrained(path_initial_model_for_weight_conversion=...)`), loadable on the original base model.
`from_peft` reads a PEFT checkpoint saved with `init_lora_weights="pissa"` (unconverted, to be loaded on
the original base model) as lora_func PiSSA, rebuilding A0, B0 from the model's weight as PEFT does.

DoRA is PEFT's LoRA with `use_dora=True`: A, B and `lora_magnitude_vector` are stored; lora_func's frozen ‖W_i‖²
is rebuilt from the model's (dequantized) weight on import, as `lf.init` computes it.

IA3 and IA3-FF are both PEFT's IA3: a target in `feedforward_modules` scales its input (IA3-FF, `ia3_l` stored as
(1, d_in)), any other its output (IA3, (d_out, 1)). One lora_func Params holds one variant, so a PEFT config whose
`feedforward_modules` covers some of its targets but not all is refused, naming the two adapters it amounts to.

HRA. PEFT stores `hra_u` only and computes W R(u); lora_func computes W (R(u) − R(u0) + I) with a frozen copy u0 of
the initial u, whose columns come in equal pairs, so R(u0) = I. `to_peft` checks that u0 is so paired; `from_peft`
rebuilds u0 from u's even columns, each twice: PEFT's symmetric init, and u itself while u is still at its init.

VeRA. The shared projections are stored under `base_model.vera_A` / `base_model.vera_B` (PEFT's
`save_projection=True`, which `to_peft` always writes). A file saved with `save_projection=False` holds only the
per-target vectors; its projections are regenerated from `projection_prng_key` as `lf.init` draws them, which is
PEFT's draw.

ROAD. `road_theta` / `road_alpha` are lora_func's `theta` / `alpha` as they are, and `variant` maps one to one.
PEFT's `group_size` is one int for all targets (64 by default, also when the field is absent); lora_func's may be
None, which resolves per target to the largest power of two <= 64 dividing d_out. `to_peft` writes that int where
it is the same for every target (the same pairing, so the same function) and refuses the adapter, naming
`group_size`, where targets resolve differently; `from_peft` reads the int as it is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ._config import AdapterConfig, config_for
from ._init import finish_leaves
from ._params import SHARED, Params
from ._serialize import check_model
from ._targets import find_targets
from ._variant import Init, Leaves
from .kinds.linear import dense_weight, is_linear_like
from .variants import REGISTRY, variant_for
from .variants import dora as dora_variant
from .variants import pissa as pissa_variant
from .variants import road as road_variant
from .variants.lora import LoRAConfig

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
KEY_PREFIX = "base_model.model."  # PEFT's prefix for the base model's module paths in the tensor file

# PeftConfig's own fields: descriptive, no effect on the adapted function.
METADATA = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision")
METADATA_INERT = ("inference_mode", "runtime_config")
# Fields of every PEFT method here that select modules: translated to `target_names`/`exclude_names`/`layers`.
TARGETING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")
# Fields every method here requires at their default (REASONS says why).
SHARED_REQUIRED = {"bias": "none", "modules_to_save": None}
REASONS = {
    "bias": "lora_func adapters hold no bias terms",
    "modules_to_save": "lora_func adapts linear layers only; it neither trains nor stores whole modules",
    "fan_in_fan_out": "transposed (Conv1D-style) weights are not linear-like targets",
    "use_dora": "lora_func reads DoRA with a plain LoRA init only (its PiSSA and DoRA are separate variants)",
    "apply_GS": "lora_func's HRA does not offer Gram-Schmidt (R = I − 2QQᵀ is never the identity at init)",
    "lora_bias": "lora_func adapters hold no bias terms",
    "layer_replication": "lora_func does not duplicate layers",
    "target_parameters": "lora_func adapts modules, not bare parameters",
    "trainable_token_indices": "lora_func does not train embedding rows",
    "ensure_weight_tying": "lora_func does not tie adapters across modules",
    "init_lora_weights": "that initialisation rewrites the base weights, which the checkpoint does not hold; "
    "convert it to a plain LoRA with PEFT's `path_initial_model_for_weight_conversion` first",
}
ALL_LINEAR = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")  # PEFT's heads left out of "all-linear" for SEQ_CLS models


@dataclass(frozen=True)
class PeftMethod:
    """How one lora_func variant reads and writes as one PEFT method.

    variant, peft_type: the lora_func variant name and PEFT's `peft_type`.
    keys: lora_func leaf -> PEFT tensor name after the module path ("A" -> "lora_A.weight"). A leaf not in `keys`
        is not written; `rebuild` makes it on import.
    rank_fields: the PEFT fields holding `r` and `rank_pattern` (the latter None where PEFT has one rank for all
        targets: HRA, VeRA); None for a method without a rank (IA3).
    alpha_fields: the PEFT fields holding `alpha` and `alpha_pattern` (DeLoRA: its λ); None: no such field.
    required: PEFT fields lora_func can express only at this value (written on export, checked on import).
    inert: PEFT fields accepted with any value on import (no effect on the adapted function at inference),
        with the value written on export.
    absent: fields of `TARGETING` and `SHARED_REQUIRED` that this PEFT config class does not have (IA3 has no
        `layers_to_transform`): not written, and on import refused unless unset, as any unknown field.
    fields_out(cfg, written) -> {field: value}: method-specific fields written on export; `written` holds the
        common fields already chosen (IA3-FF copies `target_modules` into `feedforward_modules`).
    fields_in(fields, where) -> {config kwarg: value}: method-specific config kwargs on import; may raise.
    handled: the PEFT fields that `fields_in` (or `claims`, `shared_stored`) reads.
    claims(fields, paths, where): whether this entry reads a PEFT config of this `peft_type` whose targets are
        `paths` (several entries may share one); may raise where no entry of the type can read it.
    export_as(params) -> params: checked, or rewritten as another variant's params, before writing (PiSSA -> LoRA).
    rebuild(module, cfg, leaves) -> leaves: leaves the PEFT file does not hold, from the base layer and the leaves
        read from the file.
    tensor_out(leaf, tensor) -> tensor, tensor_in(leaf, tensor, shape) -> tensor: layout changes between a
        lora_func leaf and its PEFT tensor (e.g. IA3's (d,) vector stored as (d, 1)); identity by default.
        `tensor_in` returns the tensor unchanged where it cannot reach `shape`, and the shape check reports it.
    shared_keys: leaf of the shared entry (`SHARED`) -> its full PEFT tensor key (VeRA: "A" -> "base_model.vera_A").
    shared_stored(fields): whether an imported file holds the shared leaves; where not, they are made as `lf.init`
        makes them (the variant's `create_shared`).
    """

    variant: str
    peft_type: str
    keys: Mapping[str, str]
    rank_fields: tuple[str, str | None] | None = ("r", "rank_pattern")
    alpha_fields: tuple[str, str | None] | None = ("lora_alpha", "alpha_pattern")
    required: Mapping[str, Any] = field(default_factory=dict)
    inert: Mapping[str, Any] = field(default_factory=dict)
    absent: tuple[str, ...] = ()
    fields_out: Callable[[AdapterConfig, Mapping[str, Any]], dict[str, Any]] = lambda cfg, written: {}
    fields_in: Callable[[Mapping[str, Any], str], dict[str, Any]] = lambda fields, where: {}
    handled: tuple[str, ...] = ()
    claims: Callable[[Mapping[str, Any], list[str], str], bool] = lambda fields, paths, where: True
    export_as: Callable[[Params], Params] | None = None
    rebuild: Callable[[nn.Module, AdapterConfig, Leaves], Leaves] | None = None
    tensor_out: Callable[[str, torch.Tensor], torch.Tensor] = lambda leaf, tensor: tensor
    tensor_in: Callable[[str, torch.Tensor, tuple[int, ...]], torch.Tensor] = lambda leaf, tensor, shape: tensor
    shared_keys: Mapping[str, str] = field(default_factory=dict)
    shared_stored: Callable[[Mapping[str, Any]], bool] = lambda fields: True


# ---- LoRA and PiSSA (PEFT type LORA) --------------------------------------------------------------------------

LORA_KEYS = {"A": "lora_A.weight", "B": "lora_B.weight"}
LORA_REQUIRED = {
    "fan_in_fan_out": False,
    "use_dora": False,
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "ensure_weight_tying": False,
    "use_qalora": False,
    "megatron_config": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "use_bdlora": None,
    "velora_config": None,
    "monteclora_config": None,
    "kasa_config": None,
}
LORA_INERT = {
    "lora_dropout": 0.0,  # dropout is off at inference; lora_func trains without it
    "megatron_core": "megatron.core",
    "qalora_group_size": 16,  # read only with use_qalora
    "loftq_config": {},  # read only with init_lora_weights="loftq" (refused)
    "eva_config": None,  # init-time only: EVA leaves the base weights alone
    "corda_config": None,
    "lora_ga_config": None,
}
# Initialisations that only choose the starting A, B: the saved A, B are all there is.
LORA_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _lora_fields_out(cfg: AdapterConfig, written: Mapping[str, Any]) -> dict[str, Any]:
    return {"use_rslora": bool(getattr(cfg, "use_rslora", False)), "init_lora_weights": True}


def _lora_fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    init = fields.get("init_lora_weights", True)
    if not any(init is plain or (isinstance(init, str) and init == plain) for plain in LORA_PLAIN_INITS):
        _refuse(where, "init_lora_weights", init, REASONS["init_lora_weights"])
    return {"use_rslora": _flag(fields, "use_rslora", where)}


def _is_pissa(fields: Mapping[str, Any], paths: list[str], where: str) -> bool:
    init = fields.get("init_lora_weights")
    return isinstance(init, str) and init.startswith("pissa")


def _pissa_fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    init = fields["init_lora_weights"]
    niter = None
    if init != "pissa":
        match = re.fullmatch(r"pissa_niter_(\d+)", init)
        if match is None:
            _refuse(where, "init_lora_weights", init, "PiSSA inits are 'pissa' and 'pissa_niter_<n>'")
        niter = int(match.group(1))
    return {"use_rslora": _flag(fields, "use_rslora", where), "niter": niter}


def _pissa_rebuild(module: nn.Module, cfg: AdapterConfig, leaves: Leaves) -> Leaves:
    # PEFT's `pissa_init` on the original weight, as PEFT runs it again when it loads the checkpoint.
    A0, B0 = pissa_variant.principal_factors(dense_weight(module), cfg)
    return {"A0": A0, "B0": B0}


def _pissa_as_lora(params: Params) -> Params:
    """PiSSA's y + s·(BA − B0A0)x as the rank-2r LoRA A' = [A; A0], B' = [B, −B0] with the same scale."""
    cfg = params.config
    factor = math.sqrt(2.0) if cfg.use_rslora else 2.0  # keeps alpha / r (or alpha / √r) at twice the rank
    lora_cfg = LoRAConfig(
        r=2 * cfg.r,
        alpha=cfg.alpha * factor,
        dtype=cfg.dtype,
        target_roles=cfg.target_roles,
        target_names=cfg.target_names,
        exclude_names=cfg.exclude_names,
        layers=cfg.layers,
        rank_pattern=tuple((p, 2 * r) for p, r in cfg.rank_pattern),
        alpha_pattern=tuple((p, a * factor) for p, a in cfg.alpha_pattern),
        use_rslora=cfg.use_rslora,
    )
    entries = {}
    for path, leaves in params.items():
        A = torch.cat([leaves["A"].detach(), leaves["A0"].detach()], dim=0)  # (2r, d_in)
        B = torch.cat([leaves["B"].detach(), -leaves["B0"].detach()], dim=1)  # (d_out, 2r)
        entries[path] = {"A": A, "B": B}
    return Params(entries, lora_cfg, params.targets)


# ---- DoRA (PEFT type LORA, use_dora=True) ---------------------------------------------------------------------

DORA_KEYS = {**LORA_KEYS, "magnitude": "lora_magnitude_vector"}


def _is_dora(fields: Mapping[str, Any], paths: list[str], where: str) -> bool:
    return fields.get("use_dora") is True and not _is_pissa(fields, paths, where)


def _dora_rebuild(module: nn.Module, cfg: AdapterConfig, leaves: Leaves) -> Leaves:
    return {"weight_sq_norm": dora_variant.squared_row_norms(dense_weight(module))}


# ---- IA3 and IA3-FF (PEFT type IA3) ---------------------------------------------------------------------------

IA3_KEYS = {"l": "ia3_l"}
IA3_REQUIRED = {"fan_in_fan_out": False}
IA3_INERT = {"init_ia3_weights": True}  # init-time only
IA3_ABSENT = ("layers_to_transform", "layers_pattern", "bias")


def _feedforward(fields: Mapping[str, Any], paths: list[str], where: str) -> list[str]:
    """The targets PEFT's IA3 treats as feed-forward (`IA3Model._check_target_module_feedforward`)."""
    ff = fields.get("feedforward_modules")
    if ff is None:
        _refuse(
            where,
            "feedforward_modules",
            ff,
            "PEFT fills it from its own per-architecture table, which lora_func does not hold; name the modules "
            "([] for none)",
        )
    if not isinstance(ff, (str, list)) or (isinstance(ff, list) and not all(isinstance(f, str) for f in ff)):
        raise ValueError(f"{where}: `feedforward_modules` must be a regex string or a list of names")
    targets = fields.get("target_modules")
    if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
        raise ValueError(f"{where}: `feedforward_modules` must be a subset of `target_modules` (PEFT refuses it too)")
    if isinstance(ff, str):
        return [p for p in paths if re.fullmatch(ff, p)]
    return [p for p in paths if any(p.endswith(f) for f in ff)]  # PEFT's test: no dot boundary


def _ia3_claims(feedforward: bool) -> Callable[[Mapping[str, Any], list[str], str], bool]:
    def claims(fields: Mapping[str, Any], paths: list[str], where: str) -> bool:
        ff = _feedforward(fields, paths, where)
        if 0 < len(ff) < len(paths):
            plain = [p for p in paths if p not in ff]
            raise ValueError(
                f"{where}: `feedforward_modules`={json.dumps(fields['feedforward_modules'])} covers {len(ff)} of the "
                f"{len(paths)} modules `target_modules` selects, and one lora_func Params holds one variant: this "
                f"adapter is two in lora_func, lf.IA3Config on {_describe(plain)} and lf.IA3FFConfig on "
                f"{_describe(ff)}"
            )
        return bool(ff) == feedforward

    return claims


def _describe(paths: list[str]) -> str:
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    return f"{', '.join(names)} ({len(paths)} modules)"


def _ia3_fields_out(feedforward: bool) -> Callable[[AdapterConfig, Mapping[str, Any]], dict[str, Any]]:
    # An empty list, not null: PEFT fills a null `feedforward_modules` from its per-architecture table.
    return lambda cfg, written: {"feedforward_modules": written["target_modules"] if feedforward else []}


def _ia3_layout(feedforward: bool):
    """IA3's (d,) gain as PEFT's `ia3_l`: (1, d_in) on a feed-forward target, else (d_out, 1)."""

    def out(leaf: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(1, -1) if feedforward else tensor.reshape(-1, 1)

    def into(leaf: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        stored = (1, shape[0]) if feedforward else (shape[0], 1)
        return tensor.reshape(shape) if tuple(tensor.shape) == stored else tensor

    return out, into


IA3_OUT, IA3_IN = _ia3_layout(feedforward=False)
IA3FF_OUT, IA3FF_IN = _ia3_layout(feedforward=True)


# ---- HRA (PEFT type HRA) --------------------------------------------------------------------------------------


def _paired(u: torch.Tensor) -> torch.Tensor:
    """u's even columns, each twice: (d_in, r) with columns in equal pairs, so R(u) = I."""
    return u[:, 0::2].repeat_interleave(2, dim=1)


def _hra_checked(params: Params) -> Params:
    for path, leaves in params.items():
        if not torch.equal(leaves["u0"], _paired(leaves["u0"])):
            raise ValueError(
                f"to_peft: HRA leaf {path}.u0 does not have its columns in equal pairs, so R(u0) is not the "
                "identity and PEFT (which stores u only) would not compute what lora_func does"
            )
    return params


def _hra_rebuild(module: nn.Module, cfg: AdapterConfig, leaves: Leaves) -> Leaves:
    return {"u0": _paired(leaves["u"])}


# ---- VeRA (PEFT type VERA) ------------------------------------------------------------------------------------

VERA_KEYS = {"lambda_b": "vera_lambda_b", "lambda_d": "vera_lambda_d"}
VERA_SHARED_KEYS = {"A": "base_model.vera_A", "B": "base_model.vera_B"}
VERA_REQUIRED = {"fan_in_fan_out": False}
VERA_INERT = {"vera_dropout": 0.0, "init_weights": True}  # training-only dropout; init-time only


def _vera_fields_out(cfg: AdapterConfig, written: Mapping[str, Any]) -> dict[str, Any]:
    return {"projection_prng_key": cfg.projection_prng_key, "d_initial": cfg.d_initial, "save_projection": True}


def _vera_fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    _flag(fields, "save_projection", where)
    return {name: fields[name] for name in ("projection_prng_key", "d_initial") if name in fields}


# ---- DeLoRA (PEFT type DELORA) --------------------------------------------------------------------------------

DELORA_KEYS = {"A": "delora_A", "B": "delora_B", "lambda": "delora_lambda", "w_norm": "delora_w_norm"}
DELORA_INERT = {
    "module_dropout": 0.0,  # drops whole modules in training only
    "init_weights": True,  # init-time only
}


# ---- ROAD (PEFT type ROAD) ------------------------------------------------------------------------------------

ROAD_KEYS = {"theta": "road_theta", "alpha": "road_alpha"}
ROAD_DEFAULTS = {"variant": "road_1", "group_size": 64}  # RoadConfig's defaults, for a file that omits them
ROAD_ABSENT = ("exclude_modules", "layers_to_transform", "layers_pattern", "bias")  # RoadConfig has none of these


def _road_one_group_size(params: Params) -> Params:
    """`params` with `group_size` an int: PEFT's RoadConfig has one for all targets, lora_func's None resolves per
    target (the largest power of two <= 64 dividing d_out). Same int everywhere: written as that int, which pairs
    every target's outputs exactly as before; different ones: refused, naming `group_size`."""
    cfg = params.config
    if cfg.group_size is not None:
        return params
    sizes = {t.path: road_variant.group_size(t, cfg) for t in params.targets}
    if len(set(sizes.values())) > 1:
        by_size: dict[int, list[str]] = {}
        for path, g in sizes.items():
            by_size.setdefault(g, []).append(path)
        found = "; ".join(f"{g} for {_describe(paths)}" for g, paths in sorted(by_size.items(), reverse=True))
        common = math.gcd(*sizes.values())
        raise ValueError(
            f"to_peft: ROADConfig `group_size`=None resolves to different group sizes per target ({found}), and "
            f"PEFT's ROAD has one `group_size` for all targets; pairing differs with the group size, so this adapter "
            f"has no PEFT equivalent: train with an explicit `group_size` (e.g. {common}, which fits every target)"
        )
    return Params(dict(params.items()), dataclasses.replace(cfg, group_size=next(iter(sizes.values()))), params.targets)


def _road_fields_out(cfg: AdapterConfig, written: Mapping[str, Any]) -> dict[str, Any]:
    return {"variant": cfg.variant, "group_size": cfg.group_size}


def _road_fields_in(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    variant = fields.get("variant", ROAD_DEFAULTS["variant"])
    group_size = fields.get("group_size", ROAD_DEFAULTS["group_size"])
    if not isinstance(variant, str):
        raise ValueError(f"{where}: `variant` must be a string (road_1, road_2 or road_4), got {json.dumps(variant)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"{where}: `group_size` must be an int (PEFT's RoadConfig), got {json.dumps(group_size)}")
    return {"variant": variant, "group_size": group_size}


def _ia3_method(variant: str, *, feedforward: bool, tensor_out, tensor_in) -> PeftMethod:
    """PEFT's IA3 as lora_func's IA3 (no feed-forward targets) or IA3-FF (all targets feed-forward)."""
    return PeftMethod(
        variant=variant,
        peft_type="IA3",
        keys=IA3_KEYS,
        rank_fields=None,
        alpha_fields=None,
        required=IA3_REQUIRED,
        inert=IA3_INERT,
        absent=IA3_ABSENT,
        fields_out=_ia3_fields_out(feedforward=feedforward),
        handled=("feedforward_modules",),
        claims=_ia3_claims(feedforward=feedforward),
        tensor_out=tensor_out,
        tensor_in=tensor_in,
    )


METHODS: tuple[PeftMethod, ...] = (
    # Entries sharing a peft_type are tried in order: the more specific claim first.
    PeftMethod(
        variant="pissa",
        peft_type="LORA",
        keys=LORA_KEYS,
        required=LORA_REQUIRED,
        inert=LORA_INERT,
        fields_in=_pissa_fields_in,
        handled=("use_rslora", "init_lora_weights"),
        claims=_is_pissa,
        export_as=_pissa_as_lora,
        rebuild=_pissa_rebuild,
    ),
    PeftMethod(
        variant="dora",
        peft_type="LORA",
        keys=DORA_KEYS,
        required={**LORA_REQUIRED, "use_dora": True},
        inert=LORA_INERT,
        fields_out=_lora_fields_out,
        fields_in=_lora_fields_in,
        handled=("use_rslora", "init_lora_weights"),
        claims=_is_dora,
        rebuild=_dora_rebuild,
    ),
    PeftMethod(
        variant="lora",
        peft_type="LORA",
        keys=LORA_KEYS,
        required=LORA_REQUIRED,
        inert=LORA_INERT,
        fields_out=_lora_fields_out,
        fields_in=_lora_fields_in,
        handled=("use_rslora", "init_lora_weights"),
    ),
    PeftMethod(
        variant="delora",
        peft_type="DELORA",
        keys=DELORA_KEYS,
        alpha_fields=("delora_lambda", "lambda_pattern"),
        inert=DELORA_INERT,
    ),
    _ia3_method("ia3", feedforward=False, tensor_out=IA3_OUT, tensor_in=IA3_IN),
    _ia3_method("ia3ff", feedforward=True, tensor_out=IA3FF_OUT, tensor_in=IA3FF_IN),
    PeftMethod(
        variant="hra",
        peft_type="HRA",
        keys={"u": "hra_u"},
        rank_fields=("r", None),
        alpha_fields=None,
        required={"apply_GS": False},
        inert={"init_weights": True},  # init-time only: u0 is rebuilt paired whatever u started from
        export_as=_hra_checked,
        rebuild=_hra_rebuild,
    ),
    PeftMethod(
        variant="vera",
        peft_type="VERA",
        keys=VERA_KEYS,
        rank_fields=("r", None),
        alpha_fields=None,
        required=VERA_REQUIRED,
        inert=VERA_INERT,
        absent=("exclude_modules",),
        fields_out=_vera_fields_out,
        fields_in=_vera_fields_in,
        handled=("projection_prng_key", "d_initial", "save_projection"),
        shared_keys=VERA_SHARED_KEYS,
        shared_stored=lambda fields: fields.get("save_projection", True) is True,
    ),
    PeftMethod(
        variant="road",
        peft_type="ROAD",
        keys=ROAD_KEYS,
        rank_fields=None,
        alpha_fields=None,
        inert={"init_weights": True},  # init-time only: the saved angles and scales are all there is
        absent=ROAD_ABSENT,
        fields_out=_road_fields_out,
        fields_in=_road_fields_in,
        handled=("variant", "group_size"),
        export_as=_road_one_group_size,
    ),
)


# ---- helpers --------------------------------------------------------------------------------------------------


def _refuse(where: str, name: str, value: Any, why: str) -> None:
    raise ValueError(f"{where}: `{name}`={json.dumps(value)} is not supported: {why}")


def _flag(fields: Mapping[str, Any], name: str, where: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"{where}: `{name}` must be true or false, got {json.dumps(value)}")
    return value


def _unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, str)) and len(value) == 0)


def _number(value: float) -> int | float:
    """An integral float as an int, as PEFT's configs write `lora_alpha=16`."""
    return int(value) if float(value).is_integer() else value


def _method_for_variant(name: str, caller: str) -> PeftMethod:
    for method in METHODS:
        if method.variant == name:
            return method
    known = sorted({m.variant for m in METHODS})
    raise ValueError(f"{caller}: variant {name!r} has no PEFT counterpart in lora_func's exchange (it maps {known})")


def _layer_index(key: str, layers_pattern: Any) -> int | None:
    """The layer index PEFT reads from a module path (`check_target_module_exists`): the first numbered segment."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _all_linear(model: nn.Module, task_type: Any) -> list[str]:
    """PEFT's "all-linear": every nn.Linear and transformers Conv1D but the output layer (or the SEQ_CLS head)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    excluded: set[str] = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None and task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None)
    if head is not None:
        excluded |= {name for name, m in model.named_modules() if m is head}
    return [n for n in names if n not in excluded]


def peft_selection(model: nn.Module, fields: Mapping[str, Any], where: str) -> list[str]:
    """The module paths PEFT adapts for these config fields (`BaseTuner.inject_adapter`), in `named_modules` order."""
    target_modules = fields.get("target_modules")
    exclude = fields.get("exclude_modules")
    layers = fields.get("layers_to_transform")
    layers_pattern = fields.get("layers_pattern")
    if target_modules is None:
        raise ValueError(f"{where}: `target_modules` is null; lora_func needs the adapted modules named")
    if not isinstance(target_modules, (str, list)) or (
        isinstance(target_modules, list) and not all(isinstance(t, str) for t in target_modules)
    ):
        raise ValueError(f"{where}: `target_modules` must be a regex string or a list of names")
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        target_modules = _all_linear(model, fields.get("task_type"))
    if isinstance(target_modules, str) and layers is not None:
        raise ValueError(f"{where}: `layers_to_transform` needs a list `target_modules`, not a regex (as in PEFT)")
    if layers_pattern and layers is None:
        raise ValueError(f"{where}: `layers_pattern` needs `layers_to_transform` (as in PEFT)")
    if layers is not None and not (
        isinstance(layers, int) or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))
    ):
        raise ValueError(f"{where}: `layers_to_transform` must be an int or a list of ints, got {json.dumps(layers)}")
    use_layers = layers is not None and (layers != [] if isinstance(layers, list) else True)

    def excluded(key: str) -> bool:
        if not exclude:
            return False
        if isinstance(exclude, str):
            return re.fullmatch(exclude, key) is not None
        return key in exclude or any(key.endswith(f".{e}") for e in exclude)

    selected = []
    for key, _ in model.named_modules():
        if not key or excluded(key):
            continue
        if isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, key) is not None
        else:
            hit = key in target_modules or any(key.endswith(f".{t}") for t in target_modules)
            if hit and use_layers:
                index = _layer_index(key, layers_pattern)
                hit = index is not None and (index == layers if isinstance(layers, int) else index in layers)
        if hit:
            selected.append(key)
    return selected


def _alternation(items: list[str]) -> str:
    escaped = [re.escape(i) for i in items]
    return escaped[0] if len(escaped) == 1 else "(?:" + "|".join(escaped) + ")"


def exact_regex(paths: list[str]) -> str:
    """A regex that fully matches exactly `paths`, compact where they repeat across layers:
    `model\\.layers\\.(?:0|1)\\.(?:mlp\\.up_proj|self_attn\\.q_proj)`."""
    by_template: dict[tuple[str, str], set[str]] = {}
    plain: list[str] = []
    for path in paths:
        match = re.search(r"\.(\d+)\.", path)
        if match is None:
            plain.append(path)
            continue
        prefix, index, suffix = path[: match.start()], match.group(1), path[match.end() :]
        by_template.setdefault((prefix, suffix), set()).add(index)
    grouped: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for (prefix, suffix), indices in by_template.items():
        grouped.setdefault((prefix, tuple(sorted(indices, key=int))), []).append(suffix)
    parts = [
        rf"{re.escape(prefix)}\.{_alternation(list(indices))}\.{_alternation(sorted(suffixes))}"
        for (prefix, indices), suffixes in sorted(grouped.items())
    ]
    parts += [re.escape(p) for p in sorted(plain)]
    return parts[0] if len(parts) == 1 else "|".join(parts)


def _pattern_pairs(pairs: tuple[tuple[str, Any], ...], sort: bool) -> tuple[tuple[str, Any], ...]:
    first: dict[str, Any] = {}
    for pattern, value in pairs:
        first.setdefault(pattern, value)  # a repeated pattern never wins after its first occurrence
    items = sorted(first.items()) if sort else list(first.items())
    return tuple(items)


def _resolved(pairs: tuple[tuple[str, Any], ...], path: str, default: Any) -> Any:
    for pattern, value in pairs:
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def _patterns_out(
    pairs: tuple[tuple[str, Any], ...], default: Any, paths: list[str], name: str, caller: str
) -> dict[str, Any]:
    """`pairs` as PEFT's JSON dict. PEFT writes it with sorted keys and takes the first match in that order, so
    where sorting would change which pattern wins for some target, write one exact pattern per target instead."""
    want = {p: _resolved(pairs, p, default) for p in paths}
    out = _pattern_pairs(pairs, sort=True)
    if any(_resolved(out, p, default) != want[p] for p in paths):
        out = tuple(sorted((re.escape(p), v) for p, v in want.items() if v != default))
        if any(_resolved(out, p, default) != want[p] for p in paths):
            raise ValueError(f"{caller}: `{name}` cannot be written so that PEFT resolves it as lora_func does")
    return {pattern: value for pattern, value in out}


# ---- to_peft --------------------------------------------------------------------------------------------------


def _target_modules_out(paths: list[str], model: nn.Module | None) -> str | list[str]:
    if model is not None:
        names = sorted({p.rsplit(".", 1)[-1] for p in paths})
        if peft_selection(model, {"target_modules": names}, "to_peft") == paths:
            return names
    return exact_regex(paths)


def to_peft(params: Params, directory: str | os.PathLike, *, model: nn.Module | None = None) -> None:
    """Write `params` as a PEFT checkpoint: `adapter_model.safetensors` + `adapter_config.json` in `directory`.

    `PeftModel.from_pretrained(base_model, directory)` then computes what `lf.apply(base_model, params, ...)`
    does. `target_modules` is a regex that selects exactly the adapted modules; with `model` (the base model,
    only read) it is the short list of module names PEFT users write (`["q_proj", "v_proj"]`) where that
    selects exactly the same modules, and `base_model_name_or_path`/`auto_mapping` are filled in as PEFT does.

    Methods: LoRA (rsLoRA, rank/alpha patterns), PiSSA (written as the equivalent rank-2r LoRA, see the module
    docstring), DeLoRA, DoRA (PEFT LoRA with `use_dora`), IA3 and IA3-FF (PEFT IA3, `feedforward_modules` none or
    all of the targets), HRA, VeRA (projections stored, `save_projection=True`), ROAD (`group_size=None` written as
    the int it resolves to, where that is one int for all targets).

    >>> lf.to_peft(params, "out/peft-adapter", model=model)
    >>> peft_model = peft.PeftModel.from_pretrained(model, "out/peft-adapter")
    """
    if not isinstance(params, Params):
        raise TypeError(f"to_peft: `params` must be lora_func Params, got {type(params).__name__}")
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise ValueError(f"to_peft: `directory` {directory!r} is a file, not a directory")
    method = _method_for_variant(variant_for(params.config, caller="to_peft").name, "to_peft")
    if model is not None:
        check_model(model, params.targets, "to_peft")
    if method.export_as is not None:
        params = method.export_as(params)
        method = _method_for_variant(variant_for(params.config, caller="to_peft").name, "to_peft")

    cfg = params.config
    paths = [t.path for t in params.targets]
    if "" in paths:
        raise ValueError("to_peft: the root module is a target, and PEFT cannot adapt the root of a model")
    tensors = {}
    for path, leaf, tensor in params.leaves():
        names = method.shared_keys if path == SHARED else method.keys
        if leaf not in names:
            if method.rebuild is not None and path != SHARED:
                continue  # made again from the base layer on import
            where = "the shared leaf" if path == SHARED else "leaf"
            raise ValueError(f"to_peft: {where} {path}.{leaf} has no PEFT name in the {method.variant!r} entry")
        tensor = method.tensor_out(leaf, tensor.detach().to("cpu")).contiguous()
        tensors[names[leaf] if path == SHARED else f"{KEY_PREFIX}{path}.{names[leaf]}"] = tensor

    fields: dict[str, Any] = {
        "peft_type": method.peft_type,
        "task_type": None,
        "base_model_name_or_path": (getattr(model, "name_or_path", None) or None) if model is not None else None,
        "revision": None,
        "inference_mode": True,
        "target_modules": _target_modules_out(paths, model),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        **SHARED_REQUIRED,
        **method.required,
        **method.inert,
    }
    for name in method.absent:
        del fields[name]
    fields.update(method.fields_out(cfg, fields))
    for names, value, pairs, pattern_name in (
        (method.rank_fields, cfg.r, cfg.rank_pattern, "rank_pattern"),
        (method.alpha_fields, cfg.alpha, cfg.alpha_pattern, "alpha_pattern"),
    ):
        if names is None:
            continue
        fields[names[0]] = _number(value)
        if names[1] is not None:
            pattern = _patterns_out(pairs, value, paths, pattern_name, "to_peft")
            fields[names[1]] = {k: _number(v) for k, v in pattern.items()}
        elif any(_resolved(pairs, p, value) != value for p in paths):
            raise ValueError(
                f"to_peft: `{pattern_name}` gives some targets another value, and PEFT's {method.peft_type} has one "
                f"`{names[0]}` for all"
            )
    if model is not None:
        fields["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        f.write(json.dumps(fields, indent=2, sort_keys=True))


# ---- from_peft ------------------------------------------------------------------------------------------------


def _read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"from_peft: {directory!r} has no {CONFIG_NAME}")
    try:
        with open(path) as f:
            fields = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"from_peft: {path!r} is not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"from_peft: {path!r} is not a JSON object")
    return fields


def _read_tensors(directory: str) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        pickled = os.path.isfile(os.path.join(directory, "adapter_model.bin"))
        extra = " (adapter_model.bin is a pickle, which lora_func does not read)" if pickled else ""
        raise ValueError(f"from_peft: {directory!r} has no {WEIGHTS_NAME}{extra}")
    try:
        with safe_open(path, framework="pt") as f:
            # Copies, not views into the file's buffer: CPU BLAS results depend on the data's alignment, and a
            # round trip must give bitwise the outputs of the written params (as `lf.load`).
            return {key: f.get_tensor(key).clone() for key in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"from_peft: {path!r} is not a valid safetensors file ({e})") from None


def _candidates(fields: Mapping[str, Any], where: str) -> list[PeftMethod]:
    peft_type = fields.get("peft_type")
    candidates = [m for m in METHODS if m.peft_type == peft_type]
    if not candidates:
        known = sorted({m.peft_type for m in METHODS})
        raise ValueError(f"{where}: `peft_type`={json.dumps(peft_type)} is not one lora_func reads ({known})")
    return candidates


def _check_fields(fields: Mapping[str, Any], method: PeftMethod, where: str) -> None:
    """Every field translated, inert, or at the only value lora_func can express; unknown ones must be unset."""
    translated = {*(method.rank_fields or ()), *(method.alpha_fields or ()), *TARGETING, *method.handled}
    translated = translated - {None} - set(method.absent)
    required = {k: v for k, v in SHARED_REQUIRED.items() if k not in method.absent} | dict(method.required)
    for name, value in fields.items():
        if name in translated or name in METADATA or name in METADATA_INERT or name in method.inert:
            continue
        if name in required:
            default = required[name]
            if value != default and not (_unset(default) and _unset(value)):
                _refuse(where, name, value, REASONS.get(name, f"lora_func reads only {json.dumps(default)}"))
        elif not _unset(value):
            _refuse(where, name, value, f"lora_func does not know this {method.peft_type} field, so cannot honour it")


def _patterns_in(fields: Mapping[str, Any], name: str, where: str) -> tuple[tuple[str, Any], ...]:
    value = fields.get(name) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: `{name}` must be an object mapping patterns to values")
    return tuple(value.items())


def _targeting_config(fields: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """PEFT's targeting fields as lora_func `target_names`/`exclude_names`/`layers` (regex, re.search)."""
    target_modules = fields["target_modules"]
    exclude = fields.get("exclude_modules")
    layers = fields.get("layers_to_transform")

    def suffixes(names: list[str]) -> str:
        return rf"(?:^|\.)(?:{exact_regex(sorted(set(names)))})$"

    out: dict[str, Any] = {"target_names": None, "exclude_names": (), "layers": None}
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        chosen = set(_all_linear(model, fields.get("task_type")))
        left_out = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in chosen]
        out["exclude_names"] = tuple(f"^{re.escape(n)}$" for n in left_out)
    elif isinstance(target_modules, str):
        out["target_names"] = (f"^(?:{target_modules})$",)
    else:
        out["target_names"] = (suffixes(target_modules),)
    if isinstance(exclude, str) and exclude:
        out["exclude_names"] += (f"^(?:{exclude})$",)
    elif exclude:
        out["exclude_names"] += (suffixes(exclude),)
    if layers is not None and layers != []:
        out["layers"] = (layers,) if isinstance(layers, int) else tuple(layers)
    return out


def config_from_peft(
    fields: Mapping[str, Any], model: nn.Module, *, where: str = "from_peft"
) -> tuple[PeftMethod, AdapterConfig, list[str]]:
    """The method entry, the lora_func config (dtype float32) and the module paths PEFT would adapt in `model`,
    for the fields of an `adapter_config.json`; every field checked."""
    candidates = _candidates(fields, where)
    selection = peft_selection(model, fields, where)
    if not selection:
        raise ValueError(f"{where}: `target_modules`={json.dumps(fields['target_modules'])} selects no module")
    method = next(m for m in candidates if m.claims(fields, selection, where))
    _check_fields(fields, method, where)
    modules = dict(model.named_modules())
    for path in selection:
        if not is_linear_like(modules[path]):
            kind = type(modules[path]).__name__
            raise ValueError(
                f"{where}: `target_modules` selects {path!r} ({kind}), which is not linear-like; "
                "lora_func adapts modules with `in_features`, `out_features` and `weight` only"
            )
    kwargs: dict[str, Any] = {}
    for names, value, pattern in (
        (method.rank_fields, "r", "rank_pattern"),
        (method.alpha_fields, "alpha", "alpha_pattern"),
    ):
        if names is not None:
            if names[0] not in fields:
                raise ValueError(f"{where}: `{names[0]}` is missing")
            kwargs[value] = fields[names[0]]
            if names[1] is not None:
                kwargs[pattern] = _patterns_in(fields, names[1], where)
    try:
        cfg = REGISTRY[method.variant].config(
            **kwargs,
            **_targeting_config(fields, model),
            **method.fields_in(fields, where),
        )
    except (TypeError, ValueError) as e:
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where}: the config cannot be expressed in lora_func: {e}") from None
    return method, _exact_targets(cfg, model, selection), selection


def from_peft(directory: str | os.PathLike, model: nn.Module) -> Params:
    """Read a PEFT checkpoint directory (`adapter_model.safetensors` + `adapter_config.json`) as lora_func Params.

    `lf.apply(model, params, batch)` then computes what PEFT's `PeftModel.from_pretrained(model, directory)`
    does. Validated as strictly as `lf.load`: a config field lora_func cannot honour, a module PEFT would
    adapt that is not linear-like, missing or unexpected tensors, and wrong shapes are errors naming the
    field, key or module. `model` is only read.

    The config's `target_names` select exactly the modules PEFT's `target_modules` (and `exclude_modules`,
    `layers_to_transform`) select in `model`. `lora_dropout`/`module_dropout` are accepted and dropped: they do
    nothing at inference, and lora_func has no adapter dropout. The leaves' dtype is the file's; they train
    as after `lf.init`. Frozen leaves PEFT does not store (DoRA's ‖W_i‖², HRA's u0, VeRA's projections saved with
    `save_projection=False`) are rebuilt as the module docstring says.

    >>> params = lf.from_peft("peft-adapter/", model)
    """
    directory = os.fspath(directory)
    where = f"from_peft: {os.path.join(directory, CONFIG_NAME)!r}"
    if not os.path.isdir(directory):
        raise ValueError(f"from_peft: `directory` {directory!r} is not a directory")
    fields = _read_config(directory)
    method, cfg, selection = config_from_peft(fields, model, where=where)
    variant = REGISTRY[method.variant]
    shared_stored = variant.create_shared is not None and method.shared_stored(fields)

    tensors = _read_tensors(directory)
    where_weights = f"from_peft: {os.path.join(directory, WEIGHTS_NAME)!r}"
    expected = {f"{KEY_PREFIX}{path}.{name}" for path in selection for name in method.keys.values()}
    if shared_stored:
        expected |= set(method.shared_keys.values())
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{where_weights} has missing keys {missing[:5]} and unexpected keys {unexpected[:5]}")
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"{where_weights}: tensors must share one floating dtype, found {sorted(map(str, dtypes))}")
    cfg = dataclasses.replace(cfg, dtype=next(iter(dtypes)))
    found = tuple(find_targets(model, cfg, caller="from_peft"))

    entries: dict[str, dict[str, torch.Tensor]] = {}
    for target in found:
        target_cfg = config_for(cfg, target.path)
        try:
            shapes = variant.shapes(target, target_cfg)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        rank = f"r={target_cfg.r}, " if method.rank_fields is not None else ""
        leaves = {}
        for leaf, name in method.keys.items():
            key = f"{KEY_PREFIX}{target.path}.{name}"
            tensor = method.tensor_in(leaf, tensors[key], tuple(shapes[leaf]))
            if tuple(tensor.shape) != tuple(shapes[leaf]):
                stored = method.tensor_out(leaf, torch.empty(shapes[leaf], device="meta"))  # the PEFT layout
                raise ValueError(
                    f"{where_weights} key {key!r} has shape {tuple(tensors[key].shape)}, expected "
                    f"{tuple(stored.shape)} ({rank}{target.d_in} -> {target.d_out})"
                )
            leaves[leaf] = tensor
        module = model.get_submodule(target.path)
        if method.rebuild is not None:
            with torch.no_grad():
                leaves.update(method.rebuild(module, target_cfg, leaves))
        entries[target.path] = finish_leaves(variant, target.path, cfg, leaves, shapes, module.weight.device)
    if variant.create_shared is not None:
        shapes = variant.shared_shapes(found, cfg)
        if shared_stored:
            leaves = {}
            for leaf, key in method.shared_keys.items():
                tensor = method.tensor_in(leaf, tensors[key], tuple(shapes[leaf]))
                if tuple(tensor.shape) != tuple(shapes[leaf]):
                    raise ValueError(
                        f"{where_weights} key {key!r} has shape {tuple(tensors[key].shape)}, expected "
                        f"{tuple(shapes[leaf])} (shared by all {len(found)} targets)"
                    )
                leaves[leaf] = tensor
        else:
            leaves = variant.create_shared(found, cfg, Init(lambda: None, None))  # as `lf.init` draws them
        device = model.get_submodule(found[0].path).weight.device  # shared leaves sit with the first target, as in init
        entries[SHARED] = finish_leaves(variant, SHARED, cfg, leaves, shapes, device)
    return Params(entries, cfg, found)


def _exact_targets(cfg: AdapterConfig, model: nn.Module, selection: list[str]) -> AdapterConfig:
    """`cfg` if it selects exactly `selection` in `model`, else the same config with one exact-path regex."""
    try:
        if [t.path for t in find_targets(model, cfg, caller="from_peft")] == selection:
            return cfg
    except ValueError:
        pass
    exact = dataclasses.replace(
        cfg, target_names=(f"^(?:{exact_regex(selection)})$",), exclude_names=(), layers=None, target_roles=None
    )
    if [t.path for t in find_targets(model, exact, caller="from_peft")] != selection:
        raise RuntimeError(f"from_peft: internal error: no lora_func config selects exactly {selection[:3]}...")
    return exact
