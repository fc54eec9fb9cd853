"""A griffe extension for the API reference: lora_func's docstrings are prose with formulas, not Google or NumPy
sections. Rendered as Markdown as they are, aligned formulas would run into one paragraph and an indexing
expression such as `x[:, 1:]` inside a `>>>` example would read as a link. So runs of `>>>` lines become Python
code blocks and runs of indented lines (the formulas) text blocks; the prose stays Markdown."""

from __future__ import annotations

import griffe


def fence(text: str) -> str:
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(">>>"):
            block = []
            while i < len(lines) and (lines[i].startswith(">>>") or lines[i].startswith("...")):
                block.append(lines[i])
                i += 1
            out += ["", "```python", *block, "```", ""]
        elif line.startswith("    ") and line.strip():
            block = []
            while i < len(lines) and lines[i].startswith("    ") and lines[i].strip():
                block.append(lines[i])
                i += 1
            out += ["", "```text", *block, "```", ""]
        else:
            out.append(line)
            i += 1
    return "\n".join(out)


class FencedDocstrings(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence(obj.docstring.value)
