"""The demo's task, built offline: which standard-library module does a docstring come from?

Docstrings are collected with `inspect` from a fixed list of modules (public functions, classes, and
the public methods of those classes, defined in that module). Each module is a label, described by a
short text that the model embeds like a docstring. The split is deterministic and kept honest:

- identical texts are kept once within a module and dropped entirely when two modules share them;
- examples are grouped by their last name component within a module (`Decimal.ln` and `Context.ln`
  have near-identical docstrings), and a whole group goes to one side of the split, so no held-out
  docstring has a near-twin in training;
- the split is stratified per module (about `test_fraction` of each module's examples held out).

The docstrings come from the running interpreter, so the exact dataset depends on the Python
version; `Dataset.fingerprint` identifies it.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import random
import re
from dataclasses import dataclass

# label -> description the model embeds for that label (what a zero-shot reader would write).
LABELS: dict[str, str] = {
    "math": "math: mathematical functions on numbers: logarithms, powers, roots, trigonometry, rounding",
    "os": "os: operating system interface: files, directories, processes, environment variables, permissions",
    "re": "re: regular expressions: searching, matching, splitting and substituting patterns in strings",
    "datetime": "datetime: dates, times, durations, time zones and their arithmetic and formatting",
    "collections": "collections: container data types: ordered dicts, counters, deques, named tuples, chain maps",
    "threading": "threading: threads, locks, conditions, semaphores, barriers and events for concurrency",
    "socket": "socket: low-level network sockets, addresses, host names and connections",
    "decimal": "decimal: exact decimal fixed-point and floating-point arithmetic with contexts and rounding",
    "logging": "logging: log records, loggers, handlers, formatters, filters and log levels",
    "tarfile": "tarfile: reading and writing tar archives and their members",
    "pathlib": "pathlib: object-oriented filesystem paths: joining, parts, globbing, reading and writing files",
    "random": "random: pseudo-random numbers, random choices, shuffling and sampling from distributions",
}
# Modules whose functions report another `__module__` (os's live in the C module posix or nt).
ALIASES = {
    "os": ("os", "posix", "nt"),
    "decimal": ("decimal", "_decimal", "_pydecimal"),
    "datetime": ("datetime", "_datetime"),
}


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # index into Dataset.labels
    name: str  # e.g. "math.log" or "decimal.Context.ln"


@dataclass(frozen=True)
class Dataset:
    labels: tuple[str, ...]  # module names
    label_texts: tuple[str, ...]  # what the model embeds for each label
    train: tuple[Example, ...]
    test: tuple[Example, ...]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for ex in self.train + self.test:
            h.update(f"{ex.label}\0{ex.name}\0{ex.text}\0".encode())
        return h.hexdigest()[:16]


def _clean(doc: str, max_chars: int) -> str:
    return re.sub(r"\s+", " ", doc).strip()[:max_chars]


def _defined_in(obj: object, module: str) -> bool:
    return getattr(obj, "__module__", None) in ALIASES.get(module, (module,))


def module_docstrings(module: str, max_chars: int = 400) -> list[tuple[str, str]]:
    """(qualified name, cleaned docstring) of the public functions, classes and methods defined in `module`."""
    mod = importlib.import_module(module)
    found = []
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        if not _defined_in(obj, module):
            continue
        found.append((f"{module}.{name}", inspect.getdoc(obj)))
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if attr.startswith("_"):
                    continue
                member = getattr(member, "__func__", member)  # staticmethod / classmethod
                doc = member.__doc__ if isinstance(getattr(member, "__doc__", None), str) else None
                found.append((f"{module}.{name}.{attr}", doc and inspect.cleandoc(doc)))
    return [(name, _clean(doc, max_chars)) for name, doc in found if doc and len(doc.strip()) >= 20]


def build_dataset(
    labels: dict[str, str] = LABELS, *, per_label: int = 60, test_fraction: float = 0.3, seed: int = 0
) -> Dataset:
    """At most `per_label` examples per module, about `test_fraction` of each module held out by group."""
    names = tuple(labels)
    collected = {module: module_docstrings(module) for module in names}
    owners: dict[str, set[str]] = {}
    for module, items in collected.items():
        for _, text in items:
            owners.setdefault(text, set()).add(module)
    rng = random.Random(seed)
    train: list[Example] = []
    test: list[Example] = []
    for index, module in enumerate(names):
        groups: dict[str, list[Example]] = {}
        seen: set[str] = set()
        for name, text in collected[module]:
            if len(owners[text]) > 1 or text in seen:
                continue
            seen.add(text)
            groups.setdefault(name.rsplit(".", 1)[-1], []).append(Example(text, index, name))
        order = sorted(groups)
        rng.shuffle(order)
        chosen: list[list[Example]] = []
        total = 0
        for key in order:
            if total >= per_label:
                break
            chosen.append(groups[key])
            total += len(groups[key])
        held = 0
        for group in chosen:
            if held < test_fraction * total:
                test.extend(group)
                held += len(group)
            else:
                train.extend(group)
    return Dataset(names, tuple(labels[n] for n in names), tuple(train), tuple(test))
