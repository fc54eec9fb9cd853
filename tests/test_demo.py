"""The main job (`python -m lora_func.demo`): its dataset is honest and a short run writes what it promises."""

from __future__ import annotations

import json
import math

from lora_func import demo
from lora_func._demo_data import build_dataset


def test_dataset_is_deterministic_and_held_out_texts_are_unseen():
    a, b = build_dataset(seed=0), build_dataset(seed=0)
    assert a.fingerprint == b.fingerprint and len(a.train) == len(b.train)
    train_texts = {e.text for e in a.train}
    assert not any(e.text in train_texts for e in a.test)
    assert {e.label for e in a.test} == set(range(len(a.labels)))  # every module is held out too


def test_short_run_writes_table_json_and_plot(tmp_path, capsys):
    result = demo.main(["--steps", "2", "--variants", "lora,ia3", "--no-progress", "--out", str(tmp_path)])
    rows = result["results"]
    assert [r["variant"] for r in rows] == ["lora", "ia3"]
    for r in rows:
        assert len(r["train_loss"]) == 2 and all(math.isfinite(v) for v in r["train_loss"])
        assert 0.0 <= r["after"]["accuracy"] <= 1.0 and r["trainable_params"] > 0
        # Identity at init: every variant starts from the same zero-shot model.
        assert r["before"] == rows[0]["before"]
    assert json.loads((tmp_path / "results.json").read_text())["results"][1]["variant"] == "ia3"
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| lora | 331,776 |" in capsys.readouterr().out
