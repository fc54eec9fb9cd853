"""The variant registry: one line per variant file."""

from __future__ import annotations

from .._config import AdapterConfig
from .._variant import CAPABILITIES, Dense, Intervention, LowRank, Variant
from . import (
    adalora,
    antipasto,
    boft,
    c3a,
    delora,
    dora,
    eva,
    fourierft,
    hra,
    ia3,
    ia3ff,
    ln_tuning,
    loha,
    lokr,
    lora,
    lora_ga,
    miss,
    oft,
    pissa,
    psoft,
    randlora,
    reft,
    road,
    shira,
    ssvd,
    trainable_tokens,
    vblora,
    vera,
)


def _registered(*variants: Variant) -> dict[str, Variant]:
    """`{name: variant}`, each variant's declarations checked: one name and config class each, capabilities of the
    known kinds and none twice, and exactly one of `LowRank` / `Dense` / `Intervention` (what its ΔW is, or that it has
    none: never left to a default)."""
    out: dict[str, Variant] = {}
    for v in variants:
        kinds = [type(c) for c in v.capabilities]
        unknown = [k.__name__ for k in kinds if k not in CAPABILITIES]
        twice = sorted({k.__name__ for k in kinds if kinds.count(k) > 1})
        weight = [k.__name__ for k in kinds if k in (LowRank, Dense, Intervention)]
        if v.name in out or any(o.config is v.config for o in out.values()):
            raise RuntimeError(f"variant {v.name!r} ({v.config.__name__}) is registered twice")
        if unknown or twice or len(weight) != 1:
            raise RuntimeError(
                f"variant {v.name!r}: capabilities must be of {[c.__name__ for c in CAPABILITIES]}, none twice, and "
                f"exactly one of LowRank / Dense / Intervention; got unknown {unknown}, twice {twice}, "
                f"weight change {weight}"
            )
        out[v.name] = v
    return out


REGISTRY: dict[str, Variant] = _registered(
    lora.VARIANT,
    pissa.VARIANT,
    delora.VARIANT,
    dora.VARIANT,
    ia3.VARIANT,
    ia3ff.VARIANT,
    hra.VARIANT,
    vera.VARIANT,
    ssvd.VARIANT,
    eva.VARIANT,
    antipasto.VARIANT,
    road.VARIANT,
    loha.VARIANT,
    lokr.VARIANT,
    oft.VARIANT,
    boft.VARIANT,
    psoft.VARIANT,
    miss.VARIANT,
    shira.VARIANT,
    fourierft.VARIANT,
    ln_tuning.VARIANT,
    trainable_tokens.VARIANT,
    c3a.VARIANT,
    adalora.VARIANT,
    reft.VARIANT,
    lora_ga.VARIANT,
    randlora.VARIANT,
    vblora.VARIANT,
)
_BY_CONFIG: dict[type, Variant] = {v.config: v for v in REGISTRY.values()}


def registered(cfg: AdapterConfig) -> Variant | None:
    """The registered variant whose config class is exactly `type(cfg)`, or None."""
    return _BY_CONFIG.get(type(cfg))


def variant_for(cfg: AdapterConfig, *, caller: str = "init") -> Variant:
    """The registered variant whose config class is exactly `type(cfg)` (one dict lookup)."""
    variant = _BY_CONFIG.get(type(cfg))
    if variant is None:
        known = ", ".join(v.config.__name__ for v in REGISTRY.values())
        raise TypeError(f"{caller}: `cfg` must be one of {known}; got {type(cfg).__name__}")
    return variant
