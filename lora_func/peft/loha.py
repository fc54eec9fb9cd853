"""LoHa as PEFT's LOHA: `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b` stored as lora_func holds them, on
nn.Linear targets; `r`/`rank_pattern` and `alpha`/`alpha_pattern` as PEFT names them. PEFT's LoHa has no
`bias` field and no transformers Conv1D layer."""

from __future__ import annotations

from ..variants.loha import LEAVES
from ._method import PeftMethod

METHOD = PeftMethod(
    variant="loha",
    peft_type="LOHA",
    keys={leaf: leaf for leaf in LEAVES},
    alpha_fields=("alpha", "alpha_pattern"),
    required={"use_effective_conv2d": False},  # convolutions only (CP-decomposed kernels), which lora_func's LoHa lacks
    inert={
        "rank_dropout": 0.0,  # training only
        "module_dropout": 0.0,  # training only
        "init_weights": True,  # init-time only
    },
    absent=("bias",),
)
