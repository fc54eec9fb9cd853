"""LoRA-GA: LoRA whose A, B start at the singular directions of the weight gradient, without rewriting W.

    G = mean over the calibration batches of dL/dW ≈ U S Vᵀ    (torch.svd_lowrank, q = min(4r, d_in, d_out), niter=4)
    direction "ArB2r" (default): A0 = V[:, :r]ᵀ,  B0 = U[:, r:2r] diag(S[r:2r])
              "A2rBr": A0 = V[:, r:2r]ᵀ, B0 = U[:, :r] diag(S[:r])
              "ArBr":  A0 = V's odd columns ᵀ (1, 3, … 2r−1), B0 = U's even columns (0, 2, … 2r−2) · their S
              "random": r of the 2r directions at random, the same ones for A0 and B0
    scale "stable" (default): B0 ·= d_out^¼ / √stable_gamma;  "weight_svd": B0 ·= σ_1(W) / S_B[0] (S_B: B0's S);
          "gd_scale": A0, B0 /= s;  "unit": as they are
    y' = y + s · (B A − B0 A0) x,   A, B train; A0, B0 are frozen copies of the initial factors, s = alpha / r

Why: a LoRA's first step moves W by −η s² (B Bᵀ G + G Aᵀ A); with A, B on G's top singular directions it
approximates the full fine-tuning step −η G (the paper's gradient approximation), where plain LoRA (B = 0)
starts from a step that ignores G. Identity at init: A = A0, B = B0, so B A − B0 A0 = 0 exactly. PEFT subtracts
s·B0 A0 from the base weight instead (W_res = W − s·B0 A0); keeping the frozen factors leaves the model untouched.

G comes from `init(model, cfg, calibration_data=batches, calibration_loss=...)`: each batch's loss (by default the
output's `loss`) runs forward and backward once, and each target keeps the sum of its weight gradients divided by
its number of calls, as PEFT's `preprocess_loraga(model, config, train_step)` with a train step that calls
`loss.backward()` once per batch (`lora_func/_calibration.py`, `collect_weight_gradients`). Random draws (the
randomized SVD, "random"'s choice) use torch's global RNG as PEFT does, or, with `init`'s `seed`, an RNG forked
from it for each target. Differences from PEFT: W is never rewritten; the gradient is accumulated in float32 (PEFT:
in the weight's dtype); quantized bases (bitsandbytes) are supported, the gradient being that of the dequantized
weight (PEFT refuses them); PEFT's `cache_file` is not offered (save the adapter instead).
Wang et al. 2024, arXiv 2407.05000. Reference: peft/tuners/lora/loraga.py (`preprocess_loraga`,
`estimate_gradients`), peft/tuners/lora/layer.py (`lora_ga_init`), peft/tuners/lora/config.py (`LoraGAConfig`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .._config import AdapterConfig
from .._kind import Target
from .._variant import LINEAR_LIKE, GradientCalibration, Init, Leaves, LowRank, Padding, PeftExchange, Recipe, Variant
from . import lora, pissa

DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclass(frozen=True)
class LoRAGAConfig(AdapterConfig):
    """LoRA-GA (PEFT's `LoraConfig(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(...))`).

    direction: which of the gradient's 2r top singular directions A and B take ("ArBr", "A2rBr", "ArB2r", "random").
    scale: how B (and A) are scaled ("stable", "weight_svd", "gd_scale", "unit"); stable_gamma: the "stable" γ.
    use_rslora: s = alpha / √r. dropout: PEFT's `lora_dropout`. Needs `calibration_data` at `init` (module doc).
    """

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: float = 16.0
    use_rslora: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.direction not in DIRECTIONS:
            raise ValueError(f"LoRAGAConfig: `direction` must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.scale not in SCALES:
            raise ValueError(f"LoRAGAConfig: `scale` must be one of {SCALES}, got {self.scale!r}")
        if not self.stable_gamma > 0:
            raise ValueError(f"LoRAGAConfig: `stable_gamma` must be > 0, got {self.stable_gamma!r}")


def shapes(target: Target, cfg: LoRAGAConfig) -> dict[str, tuple[int, ...]]:
    limit = min(target.d_in, target.d_out)
    if 2 * cfg.r > limit:
        raise ValueError(
            f"LoRAGAConfig: 2·`r`={2 * cfg.r} exceeds min(d_in, d_out)={limit} of {target.path!r} "
            "(A and B take 2r singular directions of the gradient)"
        )
    return pissa.shapes(target, cfg)


@contextlib.contextmanager
def _random_source(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """torch's global RNG as it is (PEFT's draws), or, with `generator`, a fork of it seeded from `generator`."""
    if generator is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        yield


def gradient_factors(
    gradient: torch.Tensor,
    weight: Callable[[], torch.Tensor],
    cfg: LoRAGAConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r, d_in), B0 (d_out, r)) from the mean gradient (d_out, d_in): PEFT's `lora_ga_init`, step by step."""
    grad = gradient.to(torch.float32)
    r = cfg.r
    with _random_source(generator, grad.device):
        U, S, V = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)  # grad ≈ U diag(S) Vᵀ
        Vh = V.t()[: 2 * r]
        U, S = U[:, : 2 * r], S[: 2 * r]
        if cfg.direction == "ArBr":
            A, B, S_B = Vh[1 : 2 * r : 2], U[:, 0 : 2 * r : 2], S[0 : 2 * r : 2]
        elif cfg.direction == "A2rBr":
            A, B, S_B = Vh[r : 2 * r], U[:, :r], S[:r]
        elif cfg.direction == "ArB2r":
            A, B, S_B = Vh[:r], U[:, r : 2 * r], S[r : 2 * r]
        else:  # "random"
            indices = torch.randperm(2 * r)[:r]
            A, B, S_B = Vh[indices], U[:, indices], S[indices]
        B = B @ torch.diag(S_B)
        if cfg.scale == "stable":
            B = B * (grad.shape[0] ** 0.25 / cfg.stable_gamma**0.5)
        elif cfg.scale == "weight_svd":
            _, weight_S, _ = torch.svd_lowrank(weight().to(torch.float32), q=r, niter=4)
            if S_B[0] > 0:
                B = B * (weight_S[0] / S_B[0])
        elif cfg.scale == "gd_scale":
            s = lora.scale(cfg)
            A, B = A / s, B / s
    return A, B


def create(target: Target, cfg: LoRAGAConfig, init: Init) -> Leaves:
    if init.gradient is None:
        raise RuntimeError(f"LoRA-GA: no calibration gradient for {target.path!r}")
    A0, B0 = gradient_factors(init.gradient.mean, init.weight, cfg, init.generator)
    return {"A": A0.clone(), "B": B0.clone(), "A0": A0, "B0": B0}


VARIANT = Variant(
    name="lora_ga",
    config=LoRAGAConfig,
    shapes=shapes,
    create=create,
    forward=pissa.forward,  # y + s·(B A − B0 A0) x, as one rank-2r product: exactly zero at init
    merge=pissa.merge,
    frozen=("A0", "B0"),
    kinds=LINEAR_LIKE,
    calibrated=True,
    capabilities=(
        LowRank(pissa.low_rank_factors),
        Padding(axes=(("A", 0), ("B", 1), ("A0", 0), ("B0", 1)), scaled=("B", "B0")),
        PeftExchange("lora_ga"),
        # MiniLM demo, 50 steps: held-out loss 0.879 -> 0.545, acc 74.2% -> 83.0% (2e-3: 0.667; 5e-3 diverges: 2.485)
        Recipe(lr=1e-3),
        GradientCalibration(),
    ),
)
