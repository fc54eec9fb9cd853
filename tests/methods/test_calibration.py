"""The shared calibration pass: exact statistics, padding dropped, shared accumulators, clean failure."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_untouched, hook_count, minilm, minilm_calibration, qwen3_batch, snapshot, tiny_qwen3

import lora_func as lf
from lora_func._calibration import _Collector, collect_input_stats
from lora_func._targets import find_targets
from lora_func.variants import REGISTRY

CALIBRATED = sorted(name for name, v in REGISTRY.items() if v.calibrated)


def test_statistics_are_exact_and_shared_between_targets_reading_one_tensor():
    model = tiny_qwen3()
    batches = [qwen3_batch(batch=2, seq=9, seed=1), qwen3_batch(batch=1, seq=5, seed=2)]
    found = find_targets(model, lf.EVAConfig(layers=(0,)))
    rows = {t.path: [] for t in found}
    handles = [
        model.get_submodule(t.path).register_forward_pre_hook(
            lambda m, a, p=t.path: rows[p].append(a[0].reshape(-1, a[0].shape[-1]).double())
        )
        for t in found
    ]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    stats = collect_input_stats(model, found, batches, progress=False)
    for target in found:
        X = torch.cat(rows[target.path])
        s = stats[target.path]
        assert s.count == X.shape[0] == 23
        torch.testing.assert_close(s.gram, X.T @ X, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.total, X.sum(0), rtol=1e-12, atol=1e-12)
        centred = X - X.mean(0)
        torch.testing.assert_close(s.covariance(), centred.T @ centred, rtol=1e-9, atol=1e-9)
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    assert stats[attn + "q_proj"].gram is stats[attn + "k_proj"].gram is stats[attn + "v_proj"].gram
    assert stats[mlp + "gate_proj"].gram is stats[mlp + "up_proj"].gram
    assert stats[attn + "o_proj"].gram is not stats[attn + "q_proj"].gram


def test_targets_that_stop_sharing_an_input_get_their_own_statistics():
    collector = _Collector()
    x, y, z = torch.randn(3, 4), torch.randn(2, 4), torch.randn(5, 4)
    collector.record("a", x, None)
    collector.record("b", x, None)
    collector.end_batch()
    assert collector.owner["a"] is collector.owner["b"]
    collector.record("a", y, None)  # batch 2: a and b read different tensors
    collector.record("b", z, None)
    collector.end_batch()
    collector.record("a", y, None)  # batch 3: b does not run at all
    collector.end_batch()
    stats = collector.stats()
    for path, parts in (("a", [x, y, y]), ("b", [x, z])):
        X = torch.cat(parts).double()
        torch.testing.assert_close(stats[path].gram, X.T @ X, rtol=1e-12, atol=1e-12)
        assert stats[path].count == X.shape[0]


def test_padding_is_dropped_and_the_pooler_counts_sentences():
    model = minilm()
    batches = minilm_calibration()
    found = find_targets(model, lf.EVAConfig(target_names=(r"layer\.0\.attention\.self\.query$", "pooler")))
    stats = collect_input_stats(model, found, batches, progress=False)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    sentences = sum(b["input_ids"].shape[0] for b in batches)
    assert tokens < sum(b["input_ids"].numel() for b in batches)  # there is padding to drop
    assert stats["encoder.layer.0.attention.self.query"].count == tokens
    assert stats["pooler.dense"].count == sentences


@pytest.mark.parametrize("name", CALIBRATED)
def test_missing_or_malformed_calibration_data_is_a_clear_error(name):
    model = tiny_qwen3()
    cfg = REGISTRY[name].config(r=4)
    with pytest.raises(ValueError, match="needs `calibration_data`"):
        lf.init(model, cfg)
    with pytest.raises(TypeError, match="`calibration_data` must be an iterable of batches"):
        lf.init(model, cfg, calibration_data=qwen3_batch(), progress=False)  # one batch, not a list
    with pytest.raises(ValueError, match="`calibration_data` is empty"):
        lf.init(model, cfg, calibration_data=[], progress=False)
    # 1 sequence of 6 tokens: fewer than r=8 rows reach every target.
    with pytest.raises(ValueError, match=r"gave 6 tokens to 'model\.layers\.0\.self_attn\.q_proj', fewer than `r`=8"):
        lf.init(model, REGISTRY[name].config(r=8), calibration_data=[qwen3_batch(batch=1, seq=6)], progress=False)


def test_variants_without_calibration_refuse_data():
    with pytest.raises(ValueError, match="takes no `calibration_data`"):
        lf.init(tiny_qwen3(), lf.SSVDConfig(r=4), calibration_data=[qwen3_batch()])


@pytest.mark.parametrize("name", CALIBRATED)
def test_hooks_and_modes_are_restored_when_the_model_raises(name):
    model = tiny_qwen3()
    model.model.layers[1].eval()  # mixed modes must come back as they were, module by module
    before = snapshot(model)
    modes = {n: m.training for n, m in model.named_modules()}
    hooks = hook_count(model)
    broken = {"input_ids": torch.full((1, 4), 10_000)}  # outside the vocabulary: the embedding raises
    with pytest.raises(IndexError):
        lf.init(model, REGISTRY[name].config(r=4), calibration_data=[qwen3_batch(), broken], progress=False)
    assert hook_count(model) == hooks
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert_untouched(model, before)


def test_calibration_runs_in_eval_mode():
    """Dropout must not corrupt the statistics: the pass sees eval-mode inputs, same as with model.eval()."""
    model = minilm()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    found = find_targets(model, lf.EVAConfig(target_names=(r"layer\.1\.output\.dense$",)))
    batches = minilm_calibration()
    first = collect_input_stats(model, found, batches, progress=False)
    second = collect_input_stats(model, found, batches, progress=False)
    assert model.training
    torch.testing.assert_close(first[found[0].path].gram, second[found[0].path].gram, rtol=0, atol=0)


def test_load_and_reinit_need_no_calibration_data(tmp_path):
    model = tiny_qwen3()
    cfg = lf.EVAConfig(r=2, rho=2.0, target_names=("o_proj$", "down_proj$"))
    params = lf.init(model, cfg, calibration_data=[qwen3_batch(batch=4, seq=16)], progress=False)
    assert params.config.rank_pattern and params.config.rho == 1  # the config of what was built
    assert len(params.targets) == len(lf.targets(model, cfg)) - 1  # a target was dropped
    path = tmp_path / "eva.safetensors"
    lf.save(params, path)
    loaded = lf.load(path, model)  # no data: the ranks travel in the config
    assert loaded.config == params.config and loaded.targets == params.targets
    for p, k, t in params.leaves():
        assert torch.equal(loaded[p][k], t.detach())
    assert lf.targets(model, lf.EVAConfig(r=4))  # the dry run needs no data either
    # The built config reproduces the same targets and ranks in a new init (no redistribution).
    assert lf.targets(model, params.config) == list(params.targets)
    again = lf.init(model, params.config, calibration_data=[qwen3_batch(batch=2, seq=8, seed=5)], progress=False)
    assert again.config == params.config and again.targets == params.targets
    assert all(again[p][k].shape == t.shape for p, k, t in params.leaves())


def test_eva_config_errors():
    with pytest.raises(ValueError, match="`rho` must be a number >= 1"):
        lf.EVAConfig(rho=0.5)
    with pytest.raises(TypeError, match="`whiten` must be a bool"):
        lf.EVAConfig(whiten=1)


def test_calibration_leaves_4bit_layers_as_they_are():
    """bnb's CPU eval-mode Linear4bit forward repacks the weight in place; calibration must not trigger it."""
    from conftest import tiny_qwen3_4bit

    model = tiny_qwen3_4bit()
    before = snapshot(model)
    found = find_targets(model, lf.EVAConfig())
    collect_input_stats(model, found, [qwen3_batch()], progress=False)
    assert_untouched(model, before)
