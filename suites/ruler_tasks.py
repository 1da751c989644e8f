"""RULER's synthetic tasks (Hsieh et al. 2024, arXiv:2404.06654), generated offline at a token
length measured with the model's own tokenizer.

Each task renders RULER's template and answer prefix around a context of `n` filler units
(haystack sentences, noise sentences, list entries, coded words) with the task's evidence at
fixed random depths; `fit` finds the largest `n` whose prompt, plus the task's generation budget,
fits the target length (RULER's rule: prompt tokens + tokens to generate <= length).

Tasks and how they follow RULER (synthetic.yaml):
- niah_single / niah_multikey / niah_multivalue / niah_multiquery: needles "One of the special
  magic numbers for {key} is: {value}." in a text haystack (RULER's essay type; here the embedded
  corpus or the user's text, cut into sentences); keys are two words joined by a hyphen, values
  7-digit numbers. Shapes (keys, values per key, queried keys): 1/1/1, 4/1/1, 1/4/1, 4/1/4.
  RULER's singular wording when one value is asked for.
- vt: one chain of 4 hops ("VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE", ...) in RULER's noise
  haystack; the answer is all 5 variable names.
- cwe: a numbered word list; common words appear 6 times, the others once (RULER's setting below
  4096 tokens; 30 and 3 from 4096 on). RULER asks for 10 common words; short contexts cannot hold
  60 entries, so `cwe_common(length)` scales the count (2 at 256, 4 at 512, 10 from 1280 on).
- fwe: coded words (6 random letters) with Zipf(2) counts over `length // 50` words (at least 5);
  the top-ranked one is "..." (noise), the answer is the next three.
Not done here: RULER's one-shot examples for vt and cwe (at CPU-sized lengths they would fill most
of the context), and the qa tasks (they need SQuAD / HotpotQA).

Generation budgets are answer-sized (RULER's 128 / 30 / 120 / 50 are for chatty models and cost
minutes on a CPU); `RulerSuite.max_new_tokens` overrides them.
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

NIAH_SHAPES = {  # (keys, values per key, queried keys)
    "niah_single": (1, 1, 1),
    "niah_multikey": (4, 1, 1),
    "niah_multivalue": (1, 4, 1),
    "niah_multiquery": (4, 1, 4),
}
TASKS = (*NIAH_SHAPES, "vt", "cwe", "fwe")

NIAH_TEMPLATE = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n{context}\nWhat are all the special magic {kind} "
    "for {query} mentioned in the provided text? The special magic {kind} for {query} mentioned in "
    "the provided text are"
)
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above. Answer: "
    "According to the chain(s) of variable assignment in the text above, {count} variables are "
    "assigned the value {query}, they are:"
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize "
    "the ones that appear most often.\n{context}\nQuestion: What are the {count} most common words in "
    "the above list? Answer: The top {count} words that appear most often in the list are:"
)
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
    "ignore the dots '....'. What are the three most frequently appeared words in the above coded "
    "text? Answer: According to the coded text above, the three most frequently appeared words are:"
)
NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
FWE_NOISE = "..."
ZETA_2 = math.pi**2 / 6

GENERATION_BUDGET = {
    "niah_single": 24,
    "niah_multikey": 24,
    "niah_multivalue": 48,
    "niah_multiquery": 48,
    "vt": 40,
    "fwe": 30,
}  # cwe: cwe_budget(length); sized for the zoo's small BPE vocabulary


def cwe_common(length: int) -> int:
    return min(10, max(2, length // 128))


def cwe_budget(length: int) -> int:
    return 12 * cwe_common(length) + 8


def generation_budget(task: str, length: int) -> int:
    return cwe_budget(length) if task == "cwe" else GENERATION_BUDGET[task]


@dataclass(frozen=True)
class Sample:
    task: str
    length: int  # the target: prompt tokens + max_new_tokens <= length
    index: int
    prompt: str
    answers: tuple[str, ...]
    max_new_tokens: int
    prompt_tokens: int


@dataclass(frozen=True)
class Haystack:
    text: str  # the whole source text (needle keys and values must not occur in it)
    sentences: tuple[str, ...]
    words: tuple[str, ...]  # distinct lowercase words, for keys and the cwe lists


@functools.lru_cache(maxsize=4)
def make_haystack(text: str) -> Haystack:
    """Sentences (whitespace collapsed, 3 to 30 words) and a word pool (4 to 10 letters, seen 3+ times)."""
    parts = re.split(r"(?<=[.!?])\s+|\n\s*\n", text)
    sentences = tuple(
        s for s in (" ".join(p.split()) for p in parts) if 3 <= s.count(" ") + 1 <= 30 and re.search("[A-Za-z]", s)
    )
    counts = Counter(re.findall(r"\b[a-z]{4,10}\b", text))
    words = tuple(sorted(w for w, c in counts.items() if c >= 3))
    if len(sentences) < 50 or len(words) < 100:
        raise ValueError(
            f"the haystack text is too small: {len(sentences)} sentences and {len(words)} distinct words; "
            "it needs at least 50 and 100"
        )
    return Haystack(text, sentences, words)


def fit(
    render: Callable[[int], str], count_tokens: Callable[[str], int], budget: int, upper: int, task: str, length: int
) -> tuple[int, str, int]:
    """(n, prompt, tokens) for the largest n in [0, upper] whose prompt takes <= budget tokens."""
    prompt = render(0)
    tokens = count_tokens(prompt)
    if tokens > budget:
        raise ValueError(
            f"length {length} is too short for {task}: its template and evidence alone take {tokens} "
            f"tokens and {length - budget} are kept for the answer"
        )
    lo, hi = 0, upper
    while lo < hi:  # invariant: render(lo) fits
        mid = (lo + hi + 1) // 2
        candidate = render(mid)
        size = count_tokens(candidate)
        if size <= budget:
            lo, prompt, tokens = mid, candidate, size
        else:
            hi = mid - 1
    return lo, prompt, tokens


def _insert_at_depths(units: list[str], items: list[str], depths: list[float]) -> list[str]:
    """`items` inserted into `units` at fractional depths, in the order of the depths."""
    out = list(units)
    placed = sorted(zip(depths, range(len(items))))
    for offset, (depth, i) in enumerate(placed):
        out.insert(int(depth * len(units)) + offset, items[i])
    return out


def _fresh(rng: random.Random, make: Callable[[], str], text: str, taken: set[str]) -> str:
    """A new string from `make` that the haystack text does not contain and that is not taken."""
    while True:
        value = make()
        if value not in taken and value not in text:
            taken.add(value)
            return value


def niah(task: str, rng: random.Random, hay: Haystack, count_tokens, length: int, budget: int):
    n_keys, n_values, n_queries = NIAH_SHAPES[task]
    taken: set[str] = set()
    keys = [_fresh(rng, lambda: "-".join(rng.sample(hay.words, 2)), hay.text, taken) for _ in range(n_keys)]
    values = [
        [_fresh(rng, lambda: str(rng.randint(1_000_000, 9_999_999)), hay.text, taken) for _ in range(n_values)]
        for _ in keys
    ]
    needles = [NEEDLE.format(kind="numbers", key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    depths = [rng.random() for _ in needles]
    queried = rng.sample(range(n_keys), n_queries)
    answers = tuple(v for i in queried for v in values[i])
    names = [keys[i] for i in queried]
    query = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]
    template = NIAH_TEMPLATE
    if n_queries * n_values == 1:  # RULER's singular wording
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
    kind = "number" if n_queries * n_values == 1 else "numbers"
    start = rng.randrange(len(hay.sentences))
    upper = length // 3 + 1  # a sentence has 3+ words, so 3+ tokens: more would never fit

    def render(n: int) -> str:
        units = [hay.sentences[(start + i) % len(hay.sentences)] for i in range(n)]
        context = " ".join(_insert_at_depths(units, needles, depths))
        return template.format(kind=kind, context=context, query=query)

    _, prompt, tokens = fit(render, count_tokens, budget, upper, task, length)
    return prompt, answers, tokens


def vt(rng: random.Random, count_tokens, length: int, budget: int, hops: int = 4):
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    depths = sorted(rng.random() for _ in chain)
    first = rng.randrange(len(NOISE_SENTENCES))

    def render(n: int) -> str:
        units = [NOISE_SENTENCES[(first + i) % len(NOISE_SENTENCES)] for i in range(n)]
        context = " ".join(_insert_at_depths(units, chain, depths))
        return VT_TEMPLATE.format(context=context, query=value, count=hops + 1)

    _, prompt, tokens = fit(render, count_tokens, budget, length, "vt", length)
    return prompt, tuple(names), tokens


def cwe(rng: random.Random, hay: Haystack, count_tokens, length: int, budget: int):
    n_common = cwe_common(length)
    repeat_common, repeat_other = (30, 3) if length >= 4096 else (6, 1)
    upper = min(length // 2, len(hay.words) - n_common)
    chosen = rng.sample(hay.words, n_common + upper)
    common, others = chosen[:n_common], chosen[n_common:]
    # no other word may contain a common word: a substring match would score it as a hit
    others = [w for w in others if not any(c in w or w in c for c in common)]
    seed = rng.random()

    def render(n: int) -> str:
        entries = common * repeat_common + others[:n] * repeat_other
        random.Random(f"{seed}:{n}").shuffle(entries)
        context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
        return CWE_TEMPLATE.format(context=context, count=n_common)

    _, prompt, tokens = fit(render, count_tokens, budget, len(others), "cwe", length)
    return prompt, tuple(common), tokens


def fwe_counts(n_words: int, vocab: int) -> list[int]:
    """RULER's Zipf counts (alpha 2): int(n_words * k^-2 / zeta(2)) for ranks k = 1..vocab."""
    return [int(n_words / (k * k * ZETA_2)) for k in range(1, vocab + 1)]


def fwe_well_posed(counts: list[int]) -> bool:
    """The three answers (ranks 2-4) all strictly outnumber every other coded word."""
    return min(counts[1:4]) > max(counts[4:], default=0) and counts[3] >= 1


def fwe(rng: random.Random, count_tokens, length: int, budget: int):
    vocab_size = max(5, length // 50)
    vocab: list[str] = [FWE_NOISE]
    while len(vocab) < vocab_size:
        word = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=6))
        if word not in vocab:
            vocab.append(word)
    seed = rng.random()

    def render(n: int) -> str:
        words = [w for w, c in zip(vocab, fwe_counts(n, vocab_size)) for _ in range(c)]
        random.Random(f"{seed}:{n}").shuffle(words)
        return FWE_TEMPLATE.format(context=" ".join(words))

    n, prompt, tokens = fit(render, count_tokens, budget, 2 * length, "fwe", length)
    while n > 0 and not fwe_well_posed(fwe_counts(n, vocab_size)):  # rounding can tie ranks 4 and 5
        n -= 1
        prompt = render(n)
        tokens = count_tokens(prompt)
    if not fwe_well_posed(fwe_counts(n, vocab_size)):
        raise ValueError(f"length {length} is too short for fwe: no word count gives three clear answers")
    return prompt, tuple(vocab[1:4]), tokens


def make_sample(
    task: str, length: int, index: int, seed: int, hay: Haystack, count_tokens, max_new_tokens: int = 0
) -> Sample:
    """Sample `index` of `task` at `length`: a pure function of (seed, task, length, index)."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; tasks: {', '.join(TASKS)}")
    new_tokens = max_new_tokens or generation_budget(task, length)
    budget = length - new_tokens
    rng = random.Random(f"ruler:{seed}:{task}:{length}:{index}")
    if task in NIAH_SHAPES:
        prompt, answers, tokens = niah(task, rng, hay, count_tokens, length, budget)
    elif task == "vt":
        prompt, answers, tokens = vt(rng, count_tokens, length, budget)
    elif task == "cwe":
        prompt, answers, tokens = cwe(rng, hay, count_tokens, length, budget)
    else:
        prompt, answers, tokens = fwe(rng, count_tokens, length, budget)
    return Sample(task, length, index, prompt, answers, new_tokens, tokens)
