"""IA3-FF as PEFT's IA3 with every target in `feedforward_modules`: `ia3_l` (1, d_in) scales the input."""

from __future__ import annotations

from . import ia3

METHOD = ia3.method("ia3ff", on_input=True)
