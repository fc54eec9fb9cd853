"""LoHa as PEFT's LOHA: `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b` stored as lora_func holds them, on
nn.Linear, nn.Conv1d and nn.Conv2d targets (a kernel flattened, PEFT's `use_effective_conv2d=False`);
`r`/`rank_pattern` and `alpha`/`alpha_pattern` as PEFT names them. PEFT's LoHa has no `bias` field, no
transformers Conv1D and no nn.Conv3d layer."""

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
    kinds=("linear", "conv"),
    conv_dims=(1, 2),
)
