"""The main job, `nox -s demo` (`python -m lora_func.demo`): fine-tune the chat LLM SmolLM2-135M-Instruct with
LoRA on CPU, then train K adapters in one pass and serve them in one mixed-adapter generate batch (`chat.py`).

`python -m lora_func.demo --minilm` runs the comparison of every registered variant on the pretrained MiniLM
instead (`minilm.py`); its parts are importable from here, as the notebooks use them (`demo.Task`, ...).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from .minilm import EXCLUDE as EXCLUDE
from .minilm import MAX_TOKENS as MAX_TOKENS
from .minilm import RANK as RANK
from .minilm import RECIPES as RECIPES
from .minilm import SCALE as SCALE
from .minilm import Recipe as Recipe
from .minilm import Task as Task
from .minilm import batch_order as batch_order
from .minilm import calibration as calibration
from .minilm import calibration_batches as calibration_batches
from .minilm import config_for as config_for
from .minilm import embed as embed
from .minilm import evaluate as evaluate
from .minilm import load_minilm as load_minilm
from .minilm import logits as logits
from .minilm import run_variant as run_variant


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The chat job, or with `--minilm` the MiniLM comparison; returns the results it writes."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--minilm" in args:
        from . import minilm

        args.remove("--minilm")
        return minilm.main(args)
    from . import chat

    return chat.main(args)
