"""The variant registry: one line per variant file."""

from __future__ import annotations

from .._config import AdapterConfig
from .._variant import Variant
from . import antipasto, delora, dora, eva, hra, ia3, ia3ff, lora, pissa, road, ssvd, vera

REGISTRY: dict[str, Variant] = {
    v.name: v
    for v in (
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
    )
}


def variant_for(cfg: AdapterConfig, *, caller: str = "init") -> Variant:
    """The registered variant whose config class is exactly `type(cfg)`."""
    for variant in REGISTRY.values():
        if type(cfg) is variant.config:
            return variant
    known = ", ".join(v.config.__name__ for v in REGISTRY.values())
    raise TypeError(f"{caller}: `cfg` must be one of {known}; got {type(cfg).__name__}")
