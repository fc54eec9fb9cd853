"""The chat demo's tasks, built offline from fixed word lists and a seeded generator: short instructions whose
answer is one exact string, so that greedy generation is scored by exact match.

- `json`: extract a person's name, age and city from a sentence as one line of JSON. The held-out
  sentences use names, cities and sentence templates that no training example uses, so the adapter must
  copy the fields, not recall them. A lenient score (the first `{...}` in the reply parses to the same
  object) is reported beside exact match, so a base model that answers with extra words gets its due.
- `date`: an ISO date written out as day, month name and year (`2021-03-07` -> `7 March 2021`).
- `time`: a 24-hour time in 12-hour form (`14:35` -> `2:35 pm`).
- `reverse`: four words in reverse order.

The base model is told what to do in words; it is not shown the answer format. No held-out prompt appears
in training (the split is by prompt text, and `json` also by names, cities and templates).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

NAMES = (
    "Maria Jonas Aiko Pedro Fatima Lukas Chen Amara Diego Ingrid Omar Sofia Kenji Lena Tariq Elena Mateo Priya Hugo "
    "Zara Felix Nadia Ravi Clara Yusuf Greta Malik Hana Bruno Leila Oscar Mei Tobias Ayesha Carlos Signe Emeka Julia "
    "Arjun Noor Viktor Lucia Kwame Astrid Jamal Yuki Rafael Dalia Henrik Ines Sipho Marta Farid Chloe Bao Nina Lars "
    "Esther Kofi Paula Hiro Selma Andrei Lina Ibrahim Vera Mario Ananya Erik Soraya Theo Beatriz Olu Mila Sven Amina"
).split()
HELD_OUT_NAMES = (
    "Tomas Keiko Rosa Anders Imani Pablo Freya Samir Ada Ngozi Lorenzo Saanvi Mikael Thandi Jonah Lucinda".split()
)
CITIES = (
    "Lisbon Oslo Kyoto Lima Cairo Vienna Dublin Nairobi Quito Hanoi Seoul Porto Krakow Accra Zurich Madrid Bergen "
    "Osaka Prague Athens Lagos Denver Toronto Havana Dakar Tallinn Munich Chennai Santiago Helsinki Glasgow Marseille "
    "Budapest Jakarta Karachi Montreal Kampala Valencia Sapporo Leipzig Cusco Tbilisi Boston Geneva Rabat Hamburg "
    "Naples Ottawa Busan Beirut Calgary Seville Taipei Warsaw Antwerp Luanda Gdansk Lyon Bristol Adelaide"
).split() + ["New Delhi", "Cape Town", "Buenos Aires", "Los Angeles", "Abu Dhabi", "Rio de Janeiro"]
HELD_OUT_CITIES = "Tunis Riga Bogota Perth Manila Turin Nagoya Windhoek Bilbao Vilnius".split() + [
    "Hong Kong",
    "San Jose",
]
TEMPLATES = (
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{name} ({age}) has lived in {city} for years.",
    "At {age}, {name} moved to {city}.",
    "Our new colleague {name} is {age} and comes from {city}.",
    "{city} is home to {name}, who is {age}.",
    "{name}, age {age}, works in {city}.",
)
HELD_OUT_TEMPLATES = (
    "Everyone in {city} knows {name}, who is {age}.",
    "Last spring {name}, now {age}, settled in {city}.",
)
WORDS = "apple river cloud stone tiger lamp garden violin rocket pencil mirror candle forest ocean window bread".split()
MONTHS = "January February March April May June July August September October November December".split()


@dataclass(frozen=True)
class Example:
    prompt: str  # the user's message
    answer: str  # the reply, exactly


@dataclass(frozen=True)
class Task:
    name: str
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    lenient: Callable[[str, str], bool] | None = None  # a looser score than exact match, where one is fair

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for e in self.train + self.test:
            h.update(f"{e.prompt}\0{e.answer}\0".encode())
        return h.hexdigest()[:16]


def same_json_object(reply: str, answer: str) -> bool:
    """The first `{...}` in `reply` parses to the object `answer` holds."""
    found = re.search(r"\{.*?\}", reply, re.S)
    if found is None:
        return False
    try:
        return json.loads(found.group(0)) == json.loads(answer)
    except json.JSONDecodeError:
        return False


def _person(rng: random.Random, held_out: bool) -> Example:
    names, cities, templates = (
        (HELD_OUT_NAMES, HELD_OUT_CITIES, HELD_OUT_TEMPLATES) if held_out else (NAMES, CITIES, TEMPLATES)
    )
    name, city, age, template = rng.choice(names), rng.choice(cities), rng.randint(18, 90), rng.choice(templates)
    sentence = template.format(name=name, age=age, city=city)
    return Example(
        f"Extract the name, age and city as JSON: {sentence}", json.dumps({"name": name, "age": age, "city": city})
    )


def _date(rng: random.Random, held_out: bool) -> Example:
    y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return Example(f"Write the date {y:04d}-{m:02d}-{d:02d} as day, month name and year.", f"{d} {MONTHS[m - 1]} {y}")


def _time(rng: random.Random, held_out: bool) -> Example:
    h, minute = rng.randint(0, 23), rng.randint(0, 59)
    return Example(
        f"Write {h:02d}:{minute:02d} in 12-hour time.", f"{h % 12 or 12}:{minute:02d} {'am' if h < 12 else 'pm'}"
    )


def _reverse(rng: random.Random, held_out: bool) -> Example:
    words = rng.sample(WORDS, 4)
    return Example("Reverse the order of these words: " + " ".join(words), " ".join(reversed(words)))


# name -> (example maker, lenient score or None)
TASKS: dict[str, tuple[Callable[[random.Random, bool], Example], Callable[[str, str], bool] | None]] = {
    "json": (_person, same_json_object),
    "date": (_date, None),
    "time": (_time, None),
    "reverse": (_reverse, None),
}


def _distinct(make: Callable[[], Example], count: int, avoid: set[str]) -> list[Example]:
    found: list[Example] = []
    seen = set(avoid)
    for _ in range(100 * count):
        if len(found) == count:
            break
        example = make()
        if example.prompt not in seen:
            seen.add(example.prompt)
            found.append(example)
    if len(found) < count:
        raise ValueError(f"tasks: only {len(found)} distinct prompts of the {count} asked for")
    return found


def build(name: str, *, train: int, test: int, seed: int = 0) -> Task:
    """`train` and `test` examples of task `name` (a key of `TASKS`), disjoint by prompt."""
    if name not in TASKS:
        raise ValueError(f"tasks: unknown task {name!r}; tasks are {sorted(TASKS)}")
    make, lenient = TASKS[name]
    rng = random.Random(f"{name}:{seed}")
    held = _distinct(lambda: make(rng, True), test, set())
    fit = _distinct(lambda: make(rng, False), train, {e.prompt for e in held})
    return Task(name, tuple(fit), tuple(held), lenient)
