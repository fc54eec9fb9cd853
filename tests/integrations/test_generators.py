"""An `inject` block inside a generator (a streaming server) that another thread finishes: the error stays clear,
and nothing is left behind: not in the first thread's table (its later plain calls are the base model), not on
the model (no hook), and the first thread can open the same block again."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import assert_untouched, perturbed, qwen3_batch, snapshot, tiny_qwen3

import lora_func as lf


def in_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out


@pytest.mark.parametrize("finish", ["next", "close"])
def test_generator_finished_by_another_thread_leaves_nothing(finish):
    model = tiny_qwen3(num_hidden_layers=1)
    batch = qwen3_batch()
    params = perturbed(lf.init(model, lf.LoRAConfig(r=4)))
    with torch.no_grad():
        base = model(**batch).logits
        adapted = lf.apply(model, params, batch).logits
    before = snapshot(model)

    def stream():
        with lf.inject(model, params):
            with torch.no_grad():
                yield model(**batch).logits

    gen = stream()
    torch.testing.assert_close(next(gen), adapted)  # entered in this thread
    out = in_thread(lambda: next(gen, None) if finish == "next" else gen.close())
    assert isinstance(out.get("error"), RuntimeError)
    assert "must exit in the thread that entered it" in str(out["error"])

    assert_untouched(model, before)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base)  # this thread's plain call: the base model
        with lf.inject(model, params):  # and the block opens again here
            torch.testing.assert_close(model(**batch).logits, adapted)
    assert_untouched(model, before)
