"""DeLoRA as PEFT's DELORA: all four leaves stored (`delora_lambda` is λ, PEFT's `delora_lambda` field alpha)."""

from __future__ import annotations

from ._method import PeftMethod

METHOD = PeftMethod(
    variant="delora",
    peft_type="DELORA",
    keys={"A": "delora_A", "B": "delora_B", "lambda": "delora_lambda", "w_norm": "delora_w_norm"},
    alpha_fields=("delora_lambda", "lambda_pattern"),
    inert={
        "module_dropout": 0.0,  # drops whole modules in training only
        "init_weights": True,  # init-time only
    },
)
