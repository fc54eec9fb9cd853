"""AdaLoRA's rank allocator inside HF Trainer's own loop: the callback of docs/guides/training.md ("AdaLoRA under
Trainer") runs `lf.schedule` after each optimizer step, before Trainer zeroes the gradients. `trainer.train()` with
it ends where the same training written as a plain torch loop, `lf.schedule` called by hand, ends: the same ranks
removed, the same leaves; without it, or at the wrong hook, training is refused."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from components import collate, tiny_qwen3, token_rows

import lora_func as lf

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SEQ, VOCAB, BATCH, STEPS = 10, 128, 4, 6
# Steps 0-1 at the full budget, allocations at steps 2 and 3, the final one at step 4 = total_step - tfinal (it
# fills `rank_mask`), step 5 after it: every phase of the allocator within six steps.
CONFIG = lf.AdaLoRAConfig(init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=5)
CLIP = 0.05  # below the gradient's norm from the second step on (0.03 to 0.11): the allocator reads clipped gradients


def documented(name: str) -> str:
    """The python block after `<!-- example: NAME -->` in docs/guides/training.md."""
    text = (ROOT / "docs" / "guides" / "training.md").read_text()
    found = re.findall(rf"<!-- example: {re.escape(name)} -->[ \t]*\n```python\n(.*?)^```", text, re.S | re.M)
    assert len(found) == 1, name
    return found[0]


@pytest.fixture(scope="module")
def recipe() -> dict:
    """The example's callback and Trainer subclass: its code up to where it starts training with them."""
    code, _ = documented("trainer-schedule").split("\ncfg_ada = ")  # the classes, not the training run
    namespace: dict = {"__name__": "docs", "torch": torch, "lf": lf}
    exec(compile(code, "example trainer-schedule", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> dict:
    """The page's setup and its Trainer + AdaLoRA example, run as written (in a temporary directory)."""
    namespace: dict = {"__name__": "docs"}
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("docs"))
    try:
        with warnings.catch_warnings():  # Trainer's default pin_memory=True, on a machine without an accelerator
            warnings.filterwarnings("ignore", "'pin_memory' argument is set as true", UserWarning)
            for name in ("setup", "trainer-schedule"):
                exec(compile(documented(name), f"example {name}", "exec"), namespace)
        namespace["checkpoints"] = sorted(os.listdir("checkpoints-adalora"))
        namespace["schedule_files"] = [
            c for c in namespace["checkpoints"] if os.path.exists(f"checkpoints-adalora/{c}/schedule.pt")
        ]
    finally:
        os.chdir(here)
    return namespace


def dataset(rows: int = BATCH * STEPS, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    return token_rows(rows, seed, SEQ, VOCAB)


@pytest.fixture(scope="module")
def reference() -> lf.Params:
    """The training by hand: AdamW on the batches of 4 in order, loss plus `lf.regularizer`, clipping at `CLIP`,
    `lf.schedule` after the step and before `zero_grad()`."""
    model = tiny_qwen3()
    params = lf.init(model, CONFIG, seed=0)
    optimizer = torch.optim.AdamW(lf.trainable_leaves(params), lr=1e-2, weight_decay=0.0)
    state = lf.schedule_state(params)
    rows = dataset()
    for step in range(STEPS):
        batch = collate(rows[step * BATCH : (step + 1) * BATCH])
        (lf.apply(model, params, batch).loss + lf.regularizer(params)).backward()
        torch.nn.utils.clip_grad_norm_(lf.trainable_leaves(params), CLIP)
        optimizer.step()
        params, state = lf.schedule(params, state, step)
        optimizer.zero_grad()
    return params


def train(recipe, tmp_path, *, accumulation=1, callbacks=None, seed=0, resume=None, **overrides) -> Trainer:
    """The documented `RegularizedTrainer` with the documented `Schedule` callback (or `callbacks`), on the same
    batches as `reference` (sequential sampling) with the same optimizer."""
    model = tiny_qwen3()
    module = lf.AdapterModule(model, lf.init(model, CONFIG, seed=seed))
    fields = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=BATCH // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=STEPS,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=CLIP,
        train_sampling_strategy="sequential",
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    fields.update(overrides)
    trainer = recipe["RegularizedTrainer"](
        model=module,
        args=TrainingArguments(**fields),
        train_dataset=dataset(),
        data_collator=collate,
        callbacks=[recipe["Schedule"]()] if callbacks is None else callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def masks(params: lf.Params) -> dict[str, torch.Tensor]:
    return {path: entry["rank_mask"].detach().clone() for path, entry in params.items()}


def assert_same_training(trained: lf.Params, expected: lf.Params, atol: float) -> float:
    """The same ranks removed, the removed ranks' E at 0, and every leaf within `atol`; returns the largest
    difference."""
    got, want = masks(trained), masks(expected)
    assert got.keys() == want.keys()
    for path in want:
        assert torch.equal(got[path], want[path]), path
        assert not trained[path]["lora_E"][want[path] == 0].any(), path
    worst = 0.0
    for (path, leaf, a), (_, _, b) in zip(trained.leaves(), expected.leaves()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=atol, msg=f"{path}.{leaf}")
        worst = max(worst, (a.detach() - b.detach()).abs().max().item())
    return worst


@pytest.mark.slow
def test_the_reference_removes_ranks_down_to_the_budget(reference):
    """The reference is not plain LoRA: the final allocation kept target_r ranks per target on average, unevenly."""
    kept = {path: int(mask.sum()) for path, mask in masks(reference).items()}
    assert sum(kept.values()) == CONFIG.target_r * len(reference.targets)
    assert len(set(kept.values())) > 1


@pytest.mark.slow
def test_the_documented_example_trains_to_the_budget_and_saves_the_schedule(docs):
    """The page's example, as written: accumulation 2 × 2, four steps, checkpoints every 2 steps holding the
    callback's state next to the adapter."""
    params = docs["module"].params
    kept = {path: int(mask.sum()) for path, mask in masks(params).items()}
    assert sum(kept.values()) == 2 * len(params.targets) and set(kept.values()) != {6}
    assert docs["checkpoints"] == docs["schedule_files"] == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_with_the_callback_equals_the_loop_by_hand(recipe, reference, tmp_path, accumulation):
    """`trainer.train()` with the callback, in batches of 4 or as 2 micro-batches of 2 accumulated: the ranks the
    loop by hand removes, and its leaves (measured: bitwise equal; 4e-8 with accumulation), the allocator reading
    the accumulated gradients clipped to `max_grad_norm`."""
    trainer = train(recipe, tmp_path, accumulation=accumulation)
    assert_same_training(trainer.model.params, reference, atol=1e-6)
    assert max(h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h) > 1.5 * CLIP  # clipped


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", [2, 4])
def test_a_resumed_run_ends_where_the_uninterrupted_one_ends(recipe, reference, tmp_path, checkpoint):
    """Resumed (from an adapter of another seed) during the budgeting phase or right before the final allocation,
    which needs the importance averages of the earlier steps: the callback's saved state carries them; a checkpoint
    without it is refused, not resumed with the averages restarted."""
    train(recipe, tmp_path, save_strategy="steps", save_steps=2)
    resumed = train(recipe, tmp_path, seed=1, resume=str(tmp_path / "out" / f"checkpoint-{checkpoint}"))
    assert_same_training(resumed.model.params, reference, atol=1e-6)
    (tmp_path / "out" / f"checkpoint-{checkpoint}" / "schedule.pt").unlink()  # a checkpoint without it: said
    with pytest.raises(FileNotFoundError, match="schedule.pt"):
        train(recipe, tmp_path, resume=str(tmp_path / "out" / f"checkpoint-{checkpoint}"))


def test_trainer_without_the_callback_is_refused(recipe, tmp_path):
    """No callback: the first forward of train() names the missing schedule, before any step."""
    with pytest.raises(RuntimeError, match=r"never given to lf\.schedule_state.*Under HF Trainer, a TrainerCallback"):
        train(recipe, tmp_path, callbacks=[])


@pytest.mark.parametrize(
    "hook, error, message",
    [
        # Before the optimizer step: the step then changes the leaves after the schedule saw them.
        ("on_pre_optimizer_step", RuntimeError, "an optimizer step changed them after lf.schedule last ran"),
        # After zero_grad(): the gradients are gone.
        ("on_step_end", ValueError, r"no gradient for .*call lf\.schedule after backward\(\) and before zero_grad"),
    ],
)
def test_the_schedule_at_another_hook_is_refused(recipe, tmp_path, hook, error, message):
    schedule = recipe["Schedule"]
    misplaced = type("Misplaced", (schedule,), {"on_optimizer_step": TrainerCallback.on_optimizer_step})
    setattr(misplaced, hook, schedule.on_optimizer_step)
    with pytest.raises(error, match=message):
        train(recipe, tmp_path, callbacks=[misplaced()])
