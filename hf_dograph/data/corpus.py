"""The embedded corpus: several clearly different text domains, generated offline.

It lets `hf-dograph train` (and the tests) run on a fresh machine with no network and no
files. Each domain has its own vocabulary and layout, so a small model sees them as
different data. The mixture is deliberately unbalanced, as real pretraining corpora are
(SlimPajama: CommonCrawl 54%, StackExchange 3%): the default gives one domain 60% of the
characters and the smallest 2%.

Everything is drawn from `random.Random(seed)`: the same arguments give the same corpus
on every machine and in every process (which multi-process training relies on).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping

# Share of the corpus (in characters) per domain. Insertion order is the domain id order.
DEFAULT_PROPORTIONS: dict[str, float] = {
    "prose": 0.60,
    "code": 0.20,
    "dialogue": 0.10,
    "tables": 0.08,
    "arithmetic": 0.02,
}

_NOUNS = (
    "river mountain village garden teacher sailor lantern forest harbor letter window "
    "merchant orchard bridge storm winter candle meadow castle painter traveler"
).split()
_ADJECTIVES = "quiet old bright narrow distant gentle heavy golden silent crowded pale ancient".split()
_VERBS = "watched crossed remembered carried followed found painted visited opened described".split()
_ADVERBS = "slowly often quietly suddenly carefully again eagerly rarely".split()
_PLACES = "near the sea|beyond the hills|in the old town|along the road|under the stars".split("|")

_IDENTIFIERS = "items total count value result index buffer node queue cache key name size".split()
_FUNCTIONS = "compute update merge parse load flatten reverse filter_items scale normalize".split()

_SPEAKERS = ("Alice", "Bob", "Carol", "Dave", "Erin")
_QUESTIONS = (
    "How was your day?",
    "Did you finish the report?",
    "Where should we meet tomorrow?",
    "Have you seen my keys?",
    "What time does the train leave?",
    "Can you help me with this?",
)
_ANSWERS = (
    "It was fine, thanks for asking.",
    "Almost, I need one more hour.",
    "Let's meet at the cafe near the station.",
    "They are on the kitchen table.",
    "At half past seven, I think.",
    "Sure, give me a minute.",
    "Not yet, but I will look again.",
)

_CITIES = "paris lima oslo tokyo cairo quito delhi perth dakar riga".split()
_NAMES = "ana ben chen dara eli fay gus hana ivo jun kai lea".split()


def _prose(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 7)):
        sentences.append(
            f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the "
            f"{rng.choice(_NOUNS)} {rng.choice(_ADVERBS)} {rng.choice(_PLACES)}."
        )
    return " ".join(sentences)


def _code(rng: random.Random) -> str:
    name = rng.choice(_FUNCTIONS)
    a, b = rng.sample(_IDENTIFIERS, 2)
    lines = [f"def {name}({a}, {b}):"]
    if rng.random() < 0.5:
        lines += [f"    for i in range(len({a})):", f"        {a}[i] = {a}[i] * {b} + {rng.randint(0, 9)}"]
    else:
        lines += [f"    if {a} > {b}:", f"        return {a} - {b}", f"    {a} = {a} + {rng.randint(1, 99)}"]
    lines.append(f"    return {a}")
    return "\n".join(lines) + "\n"


def _dialogue(rng: random.Random) -> str:
    first, second = rng.sample(_SPEAKERS, 2)
    turns = []
    for _ in range(rng.randint(2, 4)):
        turns.append(f"{first}: {rng.choice(_QUESTIONS)}")
        turns.append(f"{second}: {rng.choice(_ANSWERS)}")
    return "\n".join(turns) + "\n"


def _tables(rng: random.Random) -> str:
    rows = ["id,name,city,score"]
    for i in range(rng.randint(3, 8)):
        rows.append(f"{i + 1},{rng.choice(_NAMES)},{rng.choice(_CITIES)},{rng.randint(0, 100)}")
    return "\n".join(rows) + "\n"


def _arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(4, 8)):
        x, y = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        result = x + y if op == "+" else x - y if op == "-" else x * y
        lines.append(f"{x} {op} {y} = {result}")  # always correct: the domain is learnable
    return "\n".join(lines) + "\n"


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "prose": _prose,
    "code": _code,
    "dialogue": _dialogue,
    "tables": _tables,
    "arithmetic": _arithmetic,
}


def normalize_proportions(proportions: Mapping[str, float] | None) -> dict[str, float]:
    """Validate `proportions` (domain name → share) and scale it to sum to 1.

    Raises `ValueError` naming an unknown domain or a negative / all-zero share.
    """
    props = dict(DEFAULT_PROPORTIONS if proportions is None else proportions)
    unknown = [name for name in props if name not in GENERATORS]
    if unknown:
        raise ValueError(
            f"unknown embedded domain(s) {unknown}: the embedded corpus has {', '.join(GENERATORS)}"
        )
    if any(float(v) < 0 for v in props.values()) or sum(float(v) for v in props.values()) <= 0:
        raise ValueError(f"embedded proportions must be >= 0 and not all zero, got {props}")
    total = sum(float(v) for v in props.values())
    return {name: float(v) / total for name, v in props.items() if float(v) > 0}


def iter_embedded_documents(
    total_chars: int = 600_000,
    proportions: Mapping[str, float] | None = None,
    seed: int = 0,
) -> Iterator[tuple[str, str]]:
    """Yield `(text, domain_name)` documents until each domain has its share of `total_chars`.

    Domains come out interleaved in a seeded random order (like a shuffled corpus), and each
    domain's text depends only on `seed` and its name, so changing one domain's share does
    not change the documents of the others.
    """
    props = normalize_proportions(proportions)
    budgets = {name: max(1, int(round(share * total_chars))) for name, share in props.items()}
    # One generator per domain, seeded from (seed, name): independent streams.
    rngs = {name: random.Random(f"{seed}:{name}") for name in props}
    produced = dict.fromkeys(props, 0)
    order_rng = random.Random(f"{seed}:order")
    live = list(props)
    while live:
        # Pick the next domain in proportion to what it still needs: an even interleave.
        weights = [budgets[name] - produced[name] for name in live]
        name = order_rng.choices(live, weights=weights)[0]
        text = GENERATORS[name](rngs[name])
        produced[name] += len(text)
        yield text, name
        if produced[name] >= budgets[name]:
            live.remove(name)


def embedded_documents(
    total_chars: int = 600_000, proportions: Mapping[str, float] | None = None, seed: int = 0
) -> list[tuple[str, str]]:
    """All documents of `iter_embedded_documents` as a list."""
    return list(iter_embedded_documents(total_chars, proportions, seed))


def embedded_domain_names(proportions: Mapping[str, float] | None = None) -> list[str]:
    """Domain names in id order (those with a share > 0)."""
    return list(normalize_proportions(proportions))
