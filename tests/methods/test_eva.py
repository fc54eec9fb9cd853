"""EVA's initialization against PEFT's (same calibration data) and against a dense SVD of the stacked inputs."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import minilm, minilm_calibration, qwen3_batch, tiny_qwen3

import lora_func as lf

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAMES = tuple(f"{p}$" for p in PROJECTIONS)


def stacked_inputs(model, paths, batches):
    """Each target's calibration inputs as (n, d_in) float64 rows, padding dropped, model in eval mode."""
    rows = {p: [] for p in paths}
    mask = [None]

    def hook(path):
        def fn(module, args):
            x = args[0]
            padded = mask[0] is not None and x.dim() == 3  # the pooler reads (batch, d): one row per sentence
            kept = x[mask[0].bool()] if padded else x.reshape(-1, x.shape[-1])
            rows[path].append(kept.double())

        return fn

    handles = [model.get_submodule(p).register_forward_pre_hook(hook(p)) for p in paths]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                mask[0] = batch.get("attention_mask")
                model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return {p: torch.cat(r) for p, r in rows.items()}


def assert_rows_match_up_to_sign(A: torch.Tensor, reference: torch.Tensor, atol: float, msg: str = ""):
    signs = torch.sign((A.double() * reference.double()).sum(1))
    torch.testing.assert_close(A.double() * signs[:, None], reference.double(), rtol=0, atol=atol, msg=msg)


@pytest.mark.parametrize("center", [True, False])
def test_eva_rows_are_the_principal_directions_of_the_stacked_inputs(center):
    model = tiny_qwen3()
    batches = [qwen3_batch(batch=2, seq=10, seed=1), qwen3_batch(batch=3, seq=7, seed=2)]
    cfg = lf.EVAConfig(r=6, rho=1, center=center, target_names=NAMES)
    params = lf.init(model, cfg, calibration_data=batches, progress=False)
    X = stacked_inputs(model, [t.path for t in params.targets], batches)
    for target in params.targets:
        x = X[target.path]
        assert x.shape[0] == 41
        x = x - x.mean(0) if center else x
        _, S, Vh = torch.linalg.svd(x, full_matrices=False)
        A = params[target.path]["A"]
        assert A.shape == (6, target.d_in)
        assert_rows_match_up_to_sign(A, Vh[:6], atol=1e-5, msg=target.path)
        assert torch.equal(params[target.path]["B"], torch.zeros(target.d_out, 6))


def test_eva_whitening_and_padding_on_pretrained_minilm():
    """Padding tokens are dropped (attention_mask); whitening divides row i by √S_i (PEFT's `whiten`)."""
    model = minilm()
    batches = minilm_calibration()
    cfg = lf.EVAConfig(r=4, rho=1, whiten=True, target_names=(r"layer\.2\.attention\.self\.query$", r"pooler"))
    params = lf.init(model, cfg, calibration_data=batches, progress=False)
    X = stacked_inputs(model, [t.path for t in params.targets], batches)
    query = next(t.path for t in params.targets if "query" in t.path)
    assert X[query].shape[0] == sum(int(b["attention_mask"].sum()) for b in batches)  # real tokens only
    for target in params.targets:
        x = X[target.path]
        _, S, Vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        assert_rows_match_up_to_sign(params[target.path]["A"], Vh[:4] / S[:4, None].sqrt(), atol=1e-5)


# (r, projections): all seven at r=4, where q/k/v (and gate/up) read one tensor and so tie; o_proj and
# down_proj at r=2, no ties, where layer 0's down_proj wins no component and loses its adapter.
@pytest.mark.parametrize("r, projections", [(4, PROJECTIONS), (2, ["o_proj", "down_proj"])], ids=["all", "o-down"])
def test_eva_matches_peft_initialization_and_rank_redistribution(r, projections):
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    batch = qwen3_batch(batch=4, seq=16)
    # PEFT iterates a randomized incremental PCA until consecutive estimates agree to `tau`; with rho=2
    # it tracks 2r components, and its top ones converge to the exact PCA (cos > 0.99999 here).
    peft_cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=projections,
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=2.0, tau=0.9999999),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(tiny_qwen3(), peft_cfg)
        initialize_lora_eva_weights(peft_model, [batch], show_progress_bar=False)
    peft_A = {}
    for path, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            peft_A[path] = module.lora_A["default"].weight

    model = tiny_qwen3()
    cfg = lf.EVAConfig(r=r, alpha=2 * r, rho=2.0, target_names=tuple(f"{p}$" for p in projections))
    params = lf.init(model, cfg, calibration_data=[batch], progress=False)
    selected = lf.targets(model, cfg)
    ranks = {t.path: params[t.path]["A"].shape[0] if t.path in params else 0 for t in selected}
    assert sum(ranks.values()) == r * len(selected)  # the budget: r per selected target
    assert len(set(ranks.values())) > 1  # redistribution happened
    if r == 2:
        assert ranks["model.layers.0.mlp.down_proj"] == 0 and "model.layers.0.mlp.down_proj" not in peft_A

    # Targets reading one tensor tie in explained variance, and PEFT may split a tie among them
    # differently: compare those as groups; all other ranks exactly.
    def group(path):
        for members, name in (({"q_proj", "k_proj", "v_proj"}, "qkv"), ({"gate_proj", "up_proj"}, "mlp_in")):
            if path.rsplit(".", 1)[1] in members:
                return path.rsplit(".", 2)[0] + "." + name
        return path

    ours, theirs = {}, {}
    for path, rank in ranks.items():
        ours.setdefault(group(path), []).append(rank)
        theirs.setdefault(group(path), []).append(peft_A[path].shape[0] if path in peft_A else 0)
    assert {g: sorted(v) for g, v in ours.items()} == {g: sorted(v) for g, v in theirs.items()}

    for target in params.targets:
        # The scale stays alpha / r = 2 whatever the rank (PEFT's adjust_scaling_factors).
        assert lf.variants.lora.scale(lf._config.config_for(params.config, target.path)) == 2.0
        A, reference = params[target.path]["A"], peft_A[target.path]
        n = min(A.shape[0], reference.shape[0])
        cos = (A[:n].double() * reference[:n].double()).sum(1).abs()
        assert cos.min() > 0.9999, (target.path, cos)
