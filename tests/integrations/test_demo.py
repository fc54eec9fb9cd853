"""The main job (`python -m lora_func.demo`): the chat job's tasks and scores are honest and a short run writes what it
promises; the MiniLM comparison (`--minilm`) likewise."""

from __future__ import annotations

import json
import math
import string

import pytest
import torch

import lora_func as lf
from lora_func import demo
from lora_func._demo_data import build_dataset
from lora_func.demo import chat, tasks

# -- the chat job ---------------------------------------------------------------------------------------------

TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_chat_model():
    """A character-level tokenizer with SmolLM2's chat format, and a tiny random Llama over it: the job's whole path
    in seconds (SmolLM2 itself takes ~15 s to load; `nox -s demo` runs it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(string.printable) - set("\x0b\x0c\r")))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>", additional_special_tokens=specials
    )
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config), tokenizer


def test_tasks_are_deterministic_and_held_out_prompts_are_unseen():
    for name in tasks.TASKS:
        a, b = tasks.build(name, train=200, test=16), tasks.build(name, train=200, test=16)
        assert a.fingerprint == b.fingerprint and len(a.train) == 200 and len(a.test) == 16
        assert not {e.prompt for e in a.test} & {e.prompt for e in a.train}
    held_out = tasks.HELD_OUT_NAMES + tasks.HELD_OUT_CITIES
    assert not [(a, b) for a in held_out for b in tasks.NAMES + tasks.CITIES if a in b or b in a]
    people = tasks.build("json", train=200, test=16)
    for e in people.test:  # unseen names, cities and sentence templates
        fields = json.loads(e.answer)
        assert fields["name"] in tasks.HELD_OUT_NAMES and fields["city"] in tasks.HELD_OUT_CITIES
        assert not any(fields["name"] in t.prompt or fields["city"] in t.prompt for t in people.train)
    assert tasks.build("time", train=1, test=1, seed=3).test != tasks.build("time", train=1, test=1, seed=4).test
    with pytest.raises(ValueError, match="unknown task 'poems'"):
        tasks.build("poems", train=1, test=1)


def test_scores_are_exact_match_and_a_lenient_json_match():
    task = tasks.Task(
        "json", (), (tasks.Example("p", '{"name": "Rosa", "age": 30, "city": "Riga"}'),) * 4, tasks.same_json_object
    )
    replies = [
        '{"name": "Rosa", "age": 30, "city": "Riga"}',  # exact
        'Sure! {"city": "Riga", "name": "Rosa", "age": 30} Hope it helps.',  # the same object, other words
        '{"name": "Rosa", "age": "30", "city": "Riga"}',  # a string age: wrong
        "Rosa, 30, Riga",
    ]
    assert chat.score(task, replies) == {"exact": 0.25, "lenient": 0.5}
    dates = tasks.build("date", train=1, test=2)
    assert chat.score(dates, [dates.test[0].answer, dates.test[1].answer + "."]) == {"exact": 0.5}


def test_task_losses_are_each_groups_own_mean():
    logits = torch.randn(4, 6, 11)
    labels = torch.randint(0, 11, (4, 6))
    labels[1, :4] = -100
    losses = chat.task_losses(logits, labels, 2)
    for g in range(2):
        rows = slice(2 * g, 2 * g + 2)
        expected = torch.nn.functional.cross_entropy(
            logits[rows, :-1].flatten(0, 1), labels[rows, 1:].flatten(), ignore_index=-100
        )
        torch.testing.assert_close(losses[g], expected)


@pytest.mark.skipif(not hasattr(lf, "inject"), reason="the chat job generates inside lf.inject")
def test_short_chat_run_writes_its_files_and_scores_what_the_models_reply(tmp_path):
    model, tokenizer = tiny_chat_model()
    result = chat.run(
        model, tokenizer, steps=2, k_steps=2, batch_size=2, k_batch_size=2, held_out=3, k_held_out=2, progress=False
    )
    result.update(settings={"threads": torch.get_num_threads()}, load_seconds=0.0, seconds=1.0)
    chat.write(result, tmp_path)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| exact match |" in (tmp_path / "table.md").read_text()
    assert "expected:" in (tmp_path / "samples.md").read_text()

    one = stored["one_adapter"]
    assert len(one["train_loss"]) == 2 and all(math.isfinite(v) for v in one["train_loss"])
    for phase in ("before", "after"):  # the reported score is the replies' score
        assert one[phase]["exact"] == sum(r[phase] == r["answer"] for r in one["replies"]) / len(one["replies"])
    c = chat.Chat(tokenizer)
    prompts = [r["prompt"] for r in one["replies"]]
    # "before" is the base model's own reply: generated again outside any adapter, it is the same.
    assert chat.generate(model, c, prompts, max_new_tokens=40) == [r["before"] for r in one["replies"]]

    many = stored["k_adapters"]
    assert many["tasks"] == list(chat.K_TASKS) and many["rows"] == 2 * 2 * len(chat.K_TASKS)
    assert all(len(curve) == 2 for curve in many["train_loss"].values())
    for name, replies in many["replies"].items():
        scores = many["scores"][name]
        assert scores["after"]["exact"] == sum(r["after"] == r["answer"] for r in replies) / len(replies)
        assert scores["before"]["exact"] == sum(r["before"] == r["answer"] for r in replies) / len(replies)


# -- the MiniLM comparison ------------------------------------------------------------------------------------


def test_minilm_dataset_is_deterministic_and_held_out_texts_are_unseen():
    a, b = build_dataset(seed=0), build_dataset(seed=0)
    assert a.fingerprint == b.fingerprint and len(a.train) == len(b.train)
    train_texts = {e.text for e in a.train}
    assert not any(e.text in train_texts for e in a.test)
    assert {e.label for e in a.test} == set(range(len(a.labels)))  # every module is held out too


@pytest.mark.slow
def test_short_minilm_run_writes_table_json_and_plot(tmp_path, capsys):
    result = demo.main(["--minilm", "--steps", "2", "--variants", "lora,ia3", "--no-progress", "--out", str(tmp_path)])
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
