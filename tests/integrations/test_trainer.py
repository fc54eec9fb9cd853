"""HF `Trainer` trains `lf.AdapterModule` as it trains any model: clipping, accumulation, checkpointing, resuming,
evaluation and prediction act on the adapter, and its checkpoints hold the adapter only."""

from __future__ import annotations

import os

import pytest
import torch
from components import collate, tiny_qwen3, token_rows

import lora_func as lf

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

ROWS, SEQ, VOCAB = 8, 10, 128


def dataset(rows: int = ROWS, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    return token_rows(rows, seed, SEQ, VOCAB)


def module(seed: int = 0, **config) -> lf.AdapterModule:
    model = tiny_qwen3()
    return lf.AdapterModule(model, lf.init(model, lf.LoRAConfig(r=4, alpha=8, **config), seed=seed))


def arguments(tmp_path, **overrides) -> TrainingArguments:
    fields = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    fields.update(overrides)
    return TrainingArguments(**fields)


def leaves(m: lf.AdapterModule) -> dict[str, torch.Tensor]:
    return {f"{p}.{leaf}": t.detach().clone() for p, leaf, t in m.params.leaves()}


def assert_same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_clipping_acts_on_the_adapter_gradient(tmp_path):
    """One SGD step on the whole dataset with max_grad_norm far below the gradient's norm: Trainer logs the norm of
    the adapter gradient computed by hand, and the step is that gradient scaled down to max_grad_norm."""
    m = module()
    before = leaves(m)
    batch = collate(dataset(4))
    reference = module()
    lf.apply(reference.base_model, reference.params, batch).loss.backward()
    grads = {f"{p}.{leaf}": t.grad for p, leaf, t in reference.params.leaves()}
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()
    max_norm, lr = 1e-2, 0.5
    assert norm > 10 * max_norm
    args = arguments(tmp_path, optim="sgd", learning_rate=lr, max_grad_norm=max_norm, max_steps=1)
    trainer = Trainer(model=m, args=args, train_dataset=dataset(4), data_collator=collate)
    trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert logged == pytest.approx([norm], rel=1e-5)
    after = leaves(m)
    coef = max_norm / (norm + 1e-6)
    expected = {k: before[k] - lr * coef * grads[k] for k in before}
    assert_same(after, expected, atol=1e-7)


def train(tmp_path, seed: int = 0, resume: str | None = None, **overrides) -> tuple[lf.AdapterModule, Trainer]:
    m = module(seed)
    trainer = Trainer(model=m, args=arguments(tmp_path, **overrides), train_dataset=dataset(), data_collator=collate)
    trainer.train(resume_from_checkpoint=resume)
    return m, trainer


def losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> tuple[lf.AdapterModule, Trainer]:
    """Two steps of 4 rows, AdamW: the run the others are compared with."""
    return train(tmp_path_factory.mktemp("plain"))


def test_gradient_accumulation_2x2_equals_batch_4(tmp_path, plain):
    """Two steps of 4 rows as 2 micro-batches of 2 accumulated, or as one batch of 4: the same adapter and the same
    logged losses (Trainer normalises by the tokens of the whole accumulated batch, which `forward` receives as
    `num_items_in_batch`; the rows' label counts differ, so that normalising each micro-batch by its own tokens
    would not match)."""
    whole, whole_trainer = plain
    split, split_trainer = train(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert_same(leaves(split), leaves(whole), atol=1e-5)
    assert losses(split_trainer) == pytest.approx(losses(whole_trainer), rel=1e-5)
    initial = leaves(module())
    assert max((whole_leaf - initial[k]).abs().max().item() for k, whole_leaf in leaves(whole).items()) > 1e-3


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_adapter(tmp_path, plain, reentrant):
    """Trainer's `activation_checkpointing=True` reaches the base model and changes nothing in the result, with
    reentrant checkpointing and without."""
    checkpointed, _ = train(
        tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    assert checkpointed.base_model.model.gradient_checkpointing
    assert_same(leaves(checkpointed), leaves(plain[0]), atol=1e-6)


def test_deprecated_gradient_checkpointing_argument_too(tmp_path, plain):
    """`gradient_checkpointing=True`, the argument's name before transformers 5, does the same."""
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):
        args = arguments(tmp_path, gradient_checkpointing=True)
    m = module()
    Trainer(model=m, args=args, train_dataset=dataset(), data_collator=collate).train()
    assert m.base_model.model.gradient_checkpointing
    assert_same(leaves(m), leaves(plain[0]), atol=1e-6)


def test_checkpoints_hold_the_adapter_and_resume_bit_for_bit(tmp_path):
    """Checkpoints every 2 of 4 steps hold the adapter's leaves and nothing of the base; resuming from the first one
    in a fresh Trainer, from an adapter of another seed, ends bitwise where the uninterrupted run ends."""
    from safetensors.torch import load_file

    saved, _ = train(tmp_path, max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    stored = load_file(checkpoint / "model.safetensors")
    assert set(stored) == set(saved.state_dict()) == {f"adapter.{k}" for k in leaves(saved)}
    assert not set(stored) & set(saved.base_model.state_dict())
    weights = sorted(f for f in os.listdir(checkpoint) if f.endswith((".safetensors", ".bin", ".pt", ".pth")))
    assert weights == ["model.safetensors", "optimizer.pt", "rng_state.pth", "scheduler.pt", "training_args.bin"]
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert len(optimizer_state) == len(list(saved.parameters()))
    adapter_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    assert os.path.getsize(checkpoint / "model.safetensors") < adapter_bytes + 16_384  # header only beyond the leaves

    assert_same(load_file(checkpoint.parent / "checkpoint-4" / "model.safetensors"), saved.state_dict(), atol=0)
    first = next(iter(leaves(module(seed=0))))
    assert not torch.equal(leaves(module(seed=1))[first], leaves(module(seed=0))[first])  # resuming must load
    resumed, _ = train(tmp_path, seed=1, max_steps=4, per_device_train_batch_size=2, resume=str(checkpoint))
    assert_same(leaves(resumed), leaves(saved), atol=0)


def test_evaluate_and_predict(plain):
    """`evaluate` reports the adapted model's loss on the eval set and `predict` its logits, as `lf.apply` computes."""
    m, trainer = plain
    data = dataset(4, seed=9)
    batch = collate(data)
    with torch.no_grad():
        m.eval()
        reference = lf.apply(m.base_model, m.params, batch)
    metrics = trainer.evaluate(eval_dataset=data)
    assert metrics["eval_loss"] == pytest.approx(reference.loss.item(), rel=1e-5)
    prediction = trainer.predict(data)
    torch.testing.assert_close(torch.as_tensor(prediction.predictions), reference.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.as_tensor(prediction.label_ids), batch["labels"])
    base_loss = m.base_model(**batch).loss.item()
    assert abs(base_loss - metrics["eval_loss"]) > 1e-4  # the adapter is in the evaluation


def test_the_trained_adapter_saves_as_lora_func_and_as_peft(tmp_path, plain):
    peft = pytest.importorskip("peft")
    m, _ = plain
    lf.save(m.params, tmp_path / "adapter.safetensors")
    loaded = lf.load(tmp_path / "adapter.safetensors", m.base_model)
    assert_same({f"{p}.{k}": t for p, k, t in loaded.leaves()}, leaves(m), atol=0)
    lf.to_peft(m.params, tmp_path / "peft", model=m.base_model)
    batch = collate(dataset(4, seed=9))
    m.eval()
    with torch.no_grad():
        ours = lf.apply(m.base_model, m.params, batch).logits
        theirs = peft.PeftModel.from_pretrained(tiny_qwen3().eval(), tmp_path / "peft")(**batch).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
