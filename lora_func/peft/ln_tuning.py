"""LN Tuning as PEFT's LN_TUNING: the copies of each norm layer's `weight` and `bias` stored as
`<module>.ln_tuning_layers.weight` / `.bias`, on the normalisation layers lora_func's norm kind reads. PEFT's
`LNTuningConfig` has no rank, alpha, bias or layer fields; `modules_to_save` as for every method."""

from __future__ import annotations

from ._method import PeftMethod

METHOD = PeftMethod(
    variant="ln_tuning",
    peft_type="LN_TUNING",
    keys={"weight": "ln_tuning_layers.weight", "bias": "ln_tuning_layers.bias"},
    rank_fields=None,
    alpha_fields=None,
    absent=("layers_to_transform", "layers_pattern", "bias"),
    kinds=("norm",),
)
