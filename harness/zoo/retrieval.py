"""Synthetic in-context retrieval for the retrieval zoo models (`*-retrieval-tiny`).

The text-only zoo models cannot retrieve from their context, so every long-context score on them
is 0 and says nothing about a compression method. The retrieval models are trained on a mixture
of the corpus text (plain next-token prediction, so held-out perplexity stays meaningful) and
synthetic retrieval documents generated here. The generator is written apart from the RULER
suite (`harness.suites.ruler_tasks`): its instructions, needle sentences, questions, answer
prefixes, key and value formats and noise sentences are its own, so the RULER suite measures
transfer to templates the model never saw. What a training document can be:

* **lookup** (pass-key, key-value lookup, multi-key, multi-value, multi-query): 1-6 keys, each
  with 1-4 values, said by needle sentences (`NEEDLES`, one picked per needle) at random line
  breaks of a filler; 1-4 of the keys are asked for (`QUESTIONS`; an answer of several values is
  asked seven times in ten with a plural question, `PLURAL_QUESTIONS`, whose answer prefix ends in
  "are"); the answer lists the values of
  each asked key in the order the needles said them, the keys in the order asked. Keys: two or
  three corpus words joined by `-`, `_`, `.` or a space, an invented syllable word, or a capital
  letter code; values: 3-9 digit numbers, capital codes, or corpus words. One document in eight is
  a key-less pass key ("the pass code is ...").
* **qa** (dense lookups): 1 key (three times in ten; then half the time with 2-4 values) or 2-8
  keys, said by needle sentences as above, then questions about every key in random order (one
  time in three a question asks 2-4 keys at once; plural questions as above), each followed by
  its answer and a line break: one document supervises as many lookups as it has keys.
  The answer's first token (where the key is looked up; the rest is copying) can weigh more
  (`first_weight`).
* **binding** (variable binding, multi-hop): a chain `name0 <- value`, `name1 <- name0`, ... of
  1-5 hops (`BINDINGS` forms), sometimes beside a decoy chain with another value; the question
  asks which names hold the value, the answer lists the chain's names in order.
* **mqar** (associative recall on the mqar suite's token sets, `harness.mqar_data`): blocks of
  2-16 key-value pairs, then each key again after 0-3 noise ids, followed by its value (the
  answer); a later block binds keys afresh. The suite's own sequences differ: they end in noise
  after the queries, and nothing is answered in them.
* **pairs** (associative recall over arbitrary tokens): 8-48 pairs of random token ids (any
  non-special id) with an optional separator token, then corpus filler, then the keys again in
  random order, each followed by its value.

Fillers: contiguous lines of the corpus train split with their line breaks (needles go between
lines), or runs of the generator's own noise sentences (`NOISE`). The held-out split is never used.
The loss (`weighted_loss`) is the mean next-token cross-entropy over text tokens plus `answer_weight`
times the mean over answer tokens: the few answer tokens pull as hard as all the text.

Determinism: a document is a function of the `random.Random` it is given; the builder seeds one
per step.

Which documents a model trains on, and in what shares, is its recipe's (`RetrievalRecipe.tasks`;
`TASK_WEIGHTS` by default). `llama-retrieval-tiny` starts from an induction circuit written into
its initial weights (`harness.zoo.circuits`) and trains on qa documents, span copies and corpus
text; `qwen35-hybrid-retrieval-tiny` trains on the same mix from qwen35-hybrid-tiny's weights;
`deltanet-retrieval-tiny` trains from deltanet-tiny's weights mostly on mqar documents (below) with
qa documents and corpus rows: it recalls pairs but finds no needle in RULER's haystacks.
docs/results.md has what each recipe reached; all three ship their weights.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

PREAMBLES = (
    "",
    "Read the notes below carefully; a question about them follows.\n",
    "Below is a long document. Somewhere in it are a few facts you will be asked about.\n",
    "Keep track of every value mentioned in this text.\n",
    "The following log contains records. Answer the question at the end.\n",
    "Context:\n",
    "A {noun} is hidden in the text below; a question follows.\n",
    "Each {noun} is written next to its name below.\n",
    "Every {noun} is important. Read on.\n",
)
NOUNS = ("code", "pass key", "number", "value", "token", "id", "password", "tag", "label", "secret")
NEEDLES = (
    "The {noun} of {key} is {value}.",
    "Remember that {key} maps to {value}.",
    "{key} has the {noun} {value}.",
    "Entry: {key} -> {value}",
    "Note: the {noun} for {key} is {value}.",
    "Record {key} = {value};",
    "It is known that the {noun} stored under {key} is {value}.",
    "[{key}] {value}",
    "For {key}, write down {value}.",
    "{key}: {value}",
    "The {noun} assigned to {key} is: {value}.",
    "Somewhere it says that {key} is: {value}.",
    "One {noun} worth keeping, the one for {key}, is {value}.",
    "In this text the {noun} linked with {key} reads {value}.",
    "{key} is: {value}.",
    "The {noun} that goes with {key} happens to be {value}.",
)
KEYLESS_NEEDLES = (
    "The pass code is {value}. Remember it. {value} is the pass code.",
    "Important: the {noun} is {value}.",
    "Write this down, the {noun} is {value}.",
)
QUESTIONS = (  # (question, answer prefix); {keys} = the asked keys, {noun}
    ("\nWhat is the {noun} of {keys}?", "\nAnswer: the {noun} of {keys} is"),
    ("\nQuestion: which {noun} belongs to {keys}?", " Answer:"),
    ("\nLook up {keys} in the text above.", " Result:"),
    ("\nRecall the {noun} given for {keys}.", " It was"),
    ("\nWhat did the text say about {keys}?", " It said the {noun} of {keys} is"),
    ("\n{keys} =", ""),
    ("\nTell me the {noun} of {keys}.", " The {noun} of {keys}:"),
    ("\nFind {keys} in the document and give its {noun}.", " The {noun} of {keys} is"),
    ("\nWhich {noun} was given for {keys} in the notes?", " The {noun} given for {keys} in the notes is"),
    ("\nWhat {noun} did the document assign to {keys}?", " The {noun} the document assigned to {keys} is"),
    ("\nName the {noun} for {keys} stated above.", " The {noun} for {keys} stated above is"),
    ("\nWhat is the {noun} for {keys} that appears earlier?", " The {noun} for {keys} that appears earlier is"),
)
PLURAL_QUESTIONS = (  # for answers of several values; {noun}s = the plural
    ("\nWhat are the {noun}s of {keys}?", " The {noun}s of {keys} are"),
    ("\nList every {noun} given for {keys}.", " The {noun}s given for {keys} are"),
    ("\nWhich {noun}s were written down for {keys}?", " The {noun}s written down for {keys} in the notes are"),
    ("\nName all the {noun}s that belong to {keys}.", " They are"),
    ("\nRecall each {noun} stored under {keys}.", " The stored {noun}s for {keys} are"),
    ("\nWhat {noun}s does the document list for {keys}?", " The {noun}s that the document lists for {keys} are"),
    ("\nGive the {noun}s recorded for {keys} earlier.", " The {noun}s recorded for {keys} earlier in the text are"),
)
KEYLESS_QUESTIONS = (
    ("\nWhat is the pass code?", " The pass code is"),
    ("\nWhat was the {noun}?", " The {noun} was"),
    ("\nRepeat the {noun}.", ""),
)
BINDINGS = ("{dst} := {src}", "let {dst} = {src};", "set {dst} to {src}.", "{dst} <- {src}", "assign {src} to {dst}.")
BIND_QUESTIONS = (
    ("\nWhich names end up holding {value}?", " Names:"),
    ("\nList every variable whose value is {value}.", " They are"),
    ("\nTrace the assignments: what holds {value}?", " Answer:"),
)
NOISE = (
    "Nothing happens here.",
    "The river keeps flowing.",
    "Keep reading.",
    "All is quiet.",
    "A bird sings in the tree.",
    "Time passes slowly.",
    "The room is empty.",
    "Clouds drift by.",
)
JOINERS = ("-", "-", "_", ".", " ")
TASK_WEIGHTS = (("lookup", 0.6), ("binding", 0.15), ("pairs", 0.1), ("copy", 0.15))
ANSWER = 2.0  # the weight that marks an answer token (text is 1, padding 0)
TASKS = {  # what each kind of document is, for a built model's info.json
    "lookup": "lookups: pass key, key-value, multi-key, multi-value, multi-query, one question",
    "qa": "lookups with a question about every key, each answered",
    "binding": "variable binding chains",
    "pairs": "random-token key-value pairs",
    "copy": "a corpus span repeated after a gap",
    "mqar": "blocks of key-value pairs over the mqar suite's token sets, then the keys again, each followed by its value",
}
MQAR_PAIRS = (2, 4, 8, 16)  # pairs per mqar block (at d_k 32, 32 pairs fill a head's state: too hard to start on)


@dataclass
class Sources:
    """What the generator draws from: corpus train lines (with their token counts) and words."""

    lines: list[str]
    line_tokens: list[int]
    words: list[str]
    vocab_size: int
    special_ids: frozenset[int]


def make_sources(train_text: str, tokenizer) -> Sources:
    lines = [ln for ln in train_text.split("\n") if ln.strip()]
    counts = [len(ids) + 1 for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]]  # + the line break
    freq: dict[str, int] = {}
    for w in re.findall(r"\b[a-z]{3,9}\b", train_text):
        freq[w] = freq.get(w, 0) + 1
    words = sorted(w for w, c in freq.items() if c >= 3)
    return Sources(lines, counts, words, len(tokenizer), frozenset(tokenizer.all_special_ids))


# ------------------------------------------------------------------------------------ pieces


def _syllable_word(rng: random.Random) -> str:
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))


def _key(rng: random.Random, src: Sources) -> str:
    r = rng.random()
    if r < 0.6:
        return rng.choice(JOINERS).join(rng.sample(src.words, rng.choice((2, 2, 3))))
    if r < 0.8:
        return _syllable_word(rng)
    return "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=rng.randint(3, 6)))


def _distinct_keys(rng: random.Random, src: Sources, n: int) -> list[str]:
    """`n` keys, none inside another (a question about one must not match another's needle)."""
    keys: list[str] = []
    while len(keys) < n:
        k = _key(rng, src)
        if all(k not in other and other not in k for other in keys):
            keys.append(k)
    return keys


def _value(rng: random.Random, src: Sources, kind: str) -> str:
    if kind == "digits":
        n = rng.choice((3, 4, 5, 6, 6, 7, 7, 7, 8, 9))
        return str(rng.randint(10 ** (n - 1), 10**n - 1))
    if kind == "code":
        return "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", k=rng.randint(4, 7)))
    return rng.choice(src.words)


def _preamble(rng: random.Random, noun: str) -> str:
    return rng.choice(PREAMBLES).replace("{noun}", noun)


def _question(rng: random.Random, noun: str, keys: list[str], values: int) -> tuple[str, str]:
    """A question about `keys` and its answer prefix: a plural one (ending in "are", most of the
    time) when the answer lists several values, else a singular one."""
    table = PLURAL_QUESTIONS if values > 1 and rng.random() < 0.7 else QUESTIONS
    question, prefix = rng.choice(table)
    return tuple(t.format(noun=noun, keys=_join_list(keys, rng)) for t in (question, prefix))


def _join_list(items: list[str], rng: random.Random) -> str:
    if len(items) == 1:
        return items[0]
    style = rng.randrange(3)
    if style == 0:
        return ", ".join(items[:-1]) + ", and " + items[-1]
    if style == 1:
        return ", ".join(items[:-1]) + " and " + items[-1]
    return ", ".join(items)


def _filler(rng: random.Random, src: Sources, tokens: int) -> list[str]:
    """Units of about `tokens` tokens in all: consecutive corpus lines, or noise sentences."""
    if tokens <= 0:
        return []
    if rng.random() < 0.75:
        out, total, i = [], 0, rng.randrange(len(src.lines))
        while total < tokens:
            out.append(src.lines[i % len(src.lines)])
            total += src.line_tokens[i % len(src.lines)]
            i += 1
        return out
    out, total = [], 0
    while total < tokens:
        s = rng.choice(NOISE)
        out.append(s)
        total += len(s) // 4 + 1
    return out


def _place(units: list[str], needles: list[str], rng: random.Random, ordered: bool = False) -> str:
    """Needles inserted between units at random depths (kept in order when `ordered`)."""
    slots = sorted(rng.randrange(len(units) + 1) for _ in needles) if units else [0] * len(needles)
    if not ordered:
        needles = rng.sample(needles, len(needles))
    out, j = [], 0
    for i in range(len(units) + 1):
        while j < len(needles) and slots[j] == i:
            out.append(needles[j])
            j += 1
        if i < len(units):
            out.append(units[i])
    sep = "\n" if rng.random() < 0.7 else " "
    return sep.join(out)


# ------------------------------------------------------------------------------------ documents


@dataclass
class Document:
    prompt: str  # everything up to the answer
    answer: str  # the continuation the model must produce (starts with a space)
    task: str


def lookup(rng: random.Random, src: Sources, filler_tokens: int) -> Document:
    noun = rng.choice(NOUNS)
    kind = rng.choice(("digits", "digits", "digits", "code", "word"))
    preamble = _preamble(rng, noun)
    if rng.random() < 0.125:  # key-less pass key
        value = _value(rng, src, kind)
        needle = rng.choice(KEYLESS_NEEDLES).format(noun=noun, value=value)
        question, prefix = (s.format(noun=noun) for s in rng.choice(KEYLESS_QUESTIONS))
        context = _place(_filler(rng, src, filler_tokens), [needle], rng)
        return Document(preamble + context + question + prefix, " " + value, "passkey")
    n_keys = rng.choice((1, 1, 2, 3, 4, 4, 5, 6))
    n_values = rng.choice((1, 1, 1, 2, 3, 4))
    n_asked = min(n_keys, rng.choice((1, 1, 1, 2, 3, 4)))
    keys = _distinct_keys(rng, src, n_keys)
    values = {
        k: [_value(rng, src, kind) for _ in range(n_values if (k == keys[0] or rng.random() < 0.5) else 1)]
        for k in keys
    }
    needles = [(k, rng.choice(NEEDLES).format(noun=noun, key=k, value=v)) for k in keys for v in values[k]]
    rng.shuffle(needles)
    # values of one key keep the order the needles say them (the answer lists them in that order)
    said = {k: [] for k in keys}
    ordered = []
    for k, text in needles:
        ordered.append(text)
        said[k].append(values[k][len(said[k])])
    asked = [keys[0]] + rng.sample(keys[1:], n_asked - 1) if rng.random() < 0.5 else rng.sample(keys, n_asked)
    answer = _join_list([v for k in asked for v in said[k]], rng)
    question, prefix = _question(rng, noun, asked, sum(len(said[k]) for k in asked))
    context = _place(_filler(rng, src, filler_tokens), ordered, rng, ordered=True)
    task = "lookup" if n_values == 1 and n_asked == 1 else "multi"
    return Document(preamble + context + question + prefix, " " + answer, task)


@dataclass
class QADocument:
    context: str  # the preamble and the filler with the needles
    turns: list[tuple[str, str]]  # (question and answer prefix, answer) for every key, in the order asked
    task: str = "qa"


def qa(rng: random.Random, src: Sources, filler_tokens: int) -> QADocument:
    """1 key (three times in ten; then half the time with 2-4 values) or 2-8 keys, and questions
    about every key in random order (one time in three a question asks 2-4 keys at once), each
    followed by its answer: one document supervises as many lookups as it has keys."""
    noun = rng.choice(NOUNS)
    kind = rng.choice(("digits", "digits", "digits", "digits", "code", "word"))
    n_keys = 1 if rng.random() < 0.3 else rng.randint(2, 8)
    n_values = rng.randint(2, 4) if n_keys == 1 and rng.random() < 0.5 else 1
    keys = _distinct_keys(rng, src, n_keys)
    values = {k: [_value(rng, src, kind) for _ in range(n_values)] for k in keys}
    needles = [(k, v) for k in keys for v in values[k]]
    rng.shuffle(needles)
    texts = [rng.choice(NEEDLES).format(noun=noun, key=k, value=v) for k, v in needles]
    context = _place(_filler(rng, src, filler_tokens), texts, rng, ordered=True)
    order = rng.sample(keys, n_keys)
    groups = []  # the keys each question asks: one, or (one time in three) 2-4 at once
    while order:
        size = rng.randint(2, 4) if len(order) > 1 and rng.random() < 1 / 3 else 1
        groups.append(order[:size])
        order = order[size:]
    turns = []
    for group in groups:  # each key's values in the order the needles say them, the keys as asked
        answer = [v for k in group for kk, v in needles if kk == k]
        question, prefix = _question(rng, noun, group, len(answer))
        turns.append((question + prefix, " " + ", ".join(answer)))
    return QADocument(_preamble(rng, noun) + context, turns)


def binding(rng: random.Random, src: Sources, filler_tokens: int) -> Document:
    def name() -> str:
        if rng.random() < 0.5:
            return "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=rng.randint(3, 6)))
        return "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 4))) + str(rng.randint(0, 99))

    form = rng.choice(BINDINGS)
    chains, taken = [], set()
    for _ in range(1 if rng.random() < 0.6 else 2):
        value = str(rng.randint(10 ** (rng.randint(2, 5)), 10**6 - 1))
        names: list[str] = []
        while len(names) < rng.randint(2, 6):
            n = name()
            if n not in taken:
                taken.add(n)
                names.append(n)
        chains.append(
            (
                value,
                names,
                [form.format(dst=names[0], src=value)]
                + [form.format(dst=names[j + 1], src=names[j]) for j in range(len(names) - 1)],
            )
        )
    value, names, _ = chains[0]
    # each chain's statements stay in order; chains interleave at random
    merged, queues = [], [list(c[2]) for c in chains]
    while any(queues):
        q = rng.choice([q for q in queues if q])
        merged.append(q.pop(0))
    question, prefix = (s.format(value=value) for s in rng.choice(BIND_QUESTIONS))
    context = _place(_filler(rng, src, filler_tokens), merged, rng, ordered=True)
    return Document(_preamble(rng, "value") + context + question + prefix, " " + _join_list(names, rng), "binding")


def pairs(rng: random.Random, src: Sources, tokens: int):
    """(head, filler, tail, group) of an associative-recall sequence over arbitrary token ids, about
    `tokens` long (see the module docstring): head and tail are id lists of `group`-token groups
    (key, value[, separator]), filler a (start, length) window of the corpus train stream for the
    caller to cut, or () when there is no room."""
    pool = [i for i in range(src.vocab_size) if i not in src.special_ids]
    n = rng.randint(8, 48)
    chosen = rng.sample(pool, 2 * n)
    keys, values = chosen[:n], chosen[n:]
    sep = [rng.choice(pool)] if rng.random() < 0.5 else []
    head = [t for k, v in zip(keys, values) for t in (k, v, *sep)]
    tail = [t for i in rng.sample(range(n), n) for t in (keys[i], values[i], *sep)]
    gap = max(0, tokens - len(head) - len(tail))
    filler = (rng.getrandbits(32), gap) if gap else ()  # (start, length) in the train stream, resolved by the caller
    return head, filler, tail, 2 + len(sep)


# ------------------------------------------------------------------------------------ batches


class RetrievalData:
    """Batches of token rows for training: corpus windows and retrieval documents, at a fixed length.

    `batch(rng, rows, length)` returns (input_ids, weights), both (rows, length + 1): weights[:, t + 1]
    marks what predicting position t + 1 is (0 padding, ANSWER an answer token, `first_weight` a qa
    answer's first token, 1 text); see weighted_loss."""

    def __init__(
        self,
        tokenizer,
        train_text: str,
        train_ids,
        lm_fraction: float = 0.4,
        task_weights=TASK_WEIGHTS,
        first_weight: float = ANSWER,
    ):
        self.tokenizer = tokenizer
        self.src = make_sources(train_text, tokenizer)
        self.train_ids = train_ids
        self.lm_fraction = lm_fraction
        self.task_weights = tuple(task_weights)
        self.first_weight = first_weight  # a qa answer's first token (the lookup; the rest is copying)
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self.mqar_ids = None  # (keys, values, noise) of the mqar suite's token sets, made at the first mqar document

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def document_row(self, rng: random.Random, length: int) -> tuple[list[int], list[float]]:
        task = rng.choices([t for t, _ in self.task_weights], [w for _, w in self.task_weights])[0]
        target = rng.randint(length // 3, length) if rng.random() < 0.3 else length
        seed = rng.getrandbits(64)  # the document's own stream: a retry with less filler redraws the same document
        if task == "copy":
            sub = random.Random(seed)
            span = sub.randint(16, max(16, min(128, target // 3)))
            gap = max(0, target - 2 * span - 1)
            a = sub.randrange(len(self.train_ids) - span)
            b = sub.randrange(len(self.train_ids) - gap - 1)
            first = self.train_ids[a : a + span].tolist()
            ids = first + self.train_ids[b : b + gap].tolist() + [self.eos] + first
            weights = [1.0] * (len(ids) - span) + [1.0] + [ANSWER] * (span - 1)
            return ids[: length + 1], weights[: length + 1]
        if task == "pairs":
            head, filler, tail, group = pairs(random.Random(seed), self.src, target)
            if filler:
                start, gap = filler
                s = start % max(1, len(self.train_ids) - gap)
                filler = self.train_ids[s : s + gap].tolist()
            ids = head + list(filler) + tail
            # the values of the second pass are the answers (key, value[, separator] per group)
            weights = [1.0] * (len(head) + len(filler)) + [ANSWER if i % group == 1 else 1.0 for i in range(len(tail))]
            return ids[: length + 1], weights[: length + 1]
        if task == "qa":
            return self.qa_row(seed, target, length)
        if task == "mqar":
            return self.mqar_row(random.Random(seed), target, length)
        make = lookup if task == "lookup" else binding
        filler = target - 60
        for _ in range(5):
            doc = make(random.Random(seed), self.src, filler)
            prompt, answer = self.encode(doc.prompt), self.encode(doc.answer)
            total = len(prompt) + len(answer) + 1
            if total <= length + 1:
                break
            filler -= total - (length + 1) + 8
        else:
            prompt = prompt[-(length - len(answer)) :]
        ids = prompt + answer + [self.eos]
        weights = [1.0] * len(prompt) + [ANSWER] * len(answer) + [1.0]
        return ids[-(length + 1) :], weights[-(length + 1) :]

    def qa_row(self, seed: int, target: int, length: int) -> tuple[list[int], list[float]]:
        """A qa document's tokens: the context, then each question, its answer (weight ANSWER, the
        first token `first_weight`) and a line break; the same document is redrawn with less filler
        until it fits `length` + 1 tokens."""
        filler, newline = target - 40, self.encode("\n")
        for _ in range(5):
            doc = qa(random.Random(seed), self.src, filler)
            ids = self.encode(doc.context)
            weights = [1.0] * len(ids)
            for turn, answer in doc.turns:
                asked, said = self.encode(turn), self.encode(answer)
                ids += asked + said + newline
                weights += [1.0] * len(asked) + [self.first_weight] + [ANSWER] * (len(said) - 1) + [1.0] * len(newline)
            if len(ids) <= length + 1:
                break
            filler -= len(ids) - (length + 1) + 8
        return ids[-(length + 1) :], weights[-(length + 1) :]

    def mqar_row(self, rng: random.Random, target: int, length: int) -> tuple[list[int], list[float]]:
        """Associative recall on the mqar suite's token sets (`harness.mqar_data`: keys, values and
        noise are disjoint id ranges), in blocks until the row is full: n pairs `k v`, then every
        key again in random order, each after 0-3 noise tokens and followed by its value (the
        answer). A later block binds keys afresh, and its questions ask for the new values."""
        if self.mqar_ids is None:
            from harness.mqar_data import tokenizer_sets
            from harness.zoo.mqar import MqarRecipe

            # the MQAR zoo model's token sets, which are the mqar suite's defaults
            sets = tokenizer_sets(self.tokenizer, MqarRecipe.num_keys, MqarRecipe.num_values)
            self.mqar_ids = sets.keys.tolist(), sets.values.tolist(), sets.noise.tolist()
        keys_pool, values_pool, noise = self.mqar_ids
        size = min(target, length + 1)
        ids: list[int] = []
        weights: list[float] = []
        while True:
            fits = [n for n in MQAR_PAIRS if 8 * n <= size - len(ids)]
            if not fits and ids:
                break
            n = rng.choice(fits or [MQAR_PAIRS[0]])
            keys, values = rng.sample(keys_pool, n), rng.sample(values_pool, n)
            ids += [t for pair in zip(keys, values) for t in pair]
            weights += [1.0] * (2 * n)
            for i in rng.sample(range(n), n):
                gap = [rng.choice(noise) for _ in range(rng.randint(0, 3))]
                ids += gap + [keys[i], values[i]]
                weights += [1.0] * (len(gap) + 1) + [ANSWER]
        tail = max(0, size - len(ids))
        ids += [rng.choice(noise) for _ in range(tail)]
        weights += [1.0] * tail
        return ids[: length + 1], weights[: length + 1]

    def batch(self, rng: random.Random, rows: int, length: int):
        import torch

        ids = torch.full((rows, length + 1), self.pad, dtype=torch.long)
        weights = torch.zeros((rows, length + 1))
        n_lm = round(rows * self.lm_fraction)
        for r in range(rows):
            if r < n_lm:
                s = rng.randrange(len(self.train_ids) - length - 1)
                ids[r] = self.train_ids[s : s + length + 1]
                weights[r] = 1.0
            else:
                row, w = self.document_row(rng, length)
                ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
                weights[r, : len(w)] = torch.tensor(w)
        weights[:, 0] = 0.0
        return ids, weights


# ------------------------------------------------------------------------------------ training


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def weighted_loss(model, ids, weights, answer_weight: float = 1.0):
    """Next-token cross-entropy, position t predicting ids[:, t + 1]: the mean over text positions
    (weight 1) plus `answer_weight` times the weighted mean over answer positions (weight > 1; their
    weights as given), so the few answer tokens pull as hard as all the text does. Returns (loss,
    per-token ce, weights)."""
    import torch.nn.functional as F

    logits = model(input_ids=ids[:, :-1], use_cache=False).logits.float()
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none")
    w = weights[:, 1:].reshape(-1)
    text, answer = w == 1, w > 1
    loss = ce[text].mean() if bool(text.any()) else ce.sum() * 0
    if bool(answer.any()):  # weighted: a qa answer's first token (the lookup) can weigh more than the rest
        loss = loss + answer_weight * (ce[answer] * w[answer]).sum() / w[answer].sum()
    return loss, ce.detach(), w


def build_retrieval_model(
    name: str,
    out_dir=None,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = 1,
    batch_size: int | None = None,
    seq_len: int | None = None,
):
    """Train a retrieval zoo model (see the module docstring) and write its save_pretrained folder.

    `steps`, `seq_len` (the longest training length; the others scale with it) and `batch_size`
    (rows at the longest length; shorter lengths get proportionally more rows, so every step sees
    about the same number of tokens) default to the entry's recipe. Returns (folder, model)."""
    import time
    from pathlib import Path

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from harness.errors import HarnessError
    from harness.zoo.folders import (
        clear_target,
        corpus_provenance,
        default_path,
        prepare_fla,
        token_streams,
        write_model_folder,
    )
    from harness.training import train_step
    from harness.zoo.corpus import load_corpus
    from harness.zoo.models import get
    from harness.zoo.tokenizer import VOCAB_SIZE, corpus_tokenizer
    from harness.zoo.train import (
        TrainConfig,
        TrainProgress,
        denormals_flushed,
        fixed_threads,
        heldout_ppl,
        lr_at,
        make_optimizer,
        unigram_ppl,
    )

    spec = get(name)
    recipe = spec.recipe
    out = Path(out_dir) if out_dir is not None else default_path(name)
    clear_target(out)
    steps = recipe.steps if steps is None else int(steps)
    if steps < 1:
        raise HarnessError(f"steps must be >= 1, got {steps}")
    longest = int(seq_len or recipe.seq_len)
    rows = int(batch_size or recipe.batch_size)
    if longest < 32 or rows < 1:
        raise HarnessError(f"seq_len must be >= 32 and batch_size >= 1, got {longest} and {rows}")
    lengths = [max(32, longest * f // 4) for f in recipe.length_quarters]
    if spec.needs_fla:
        prepare_fla()
    transformers.utils.logging.disable_progress_bar()
    corpus = load_corpus()
    tokenizer = corpus_tokenizer(corpus)
    train_ids, heldout_ids = token_streams(corpus, tokenizer)
    tasks = recipe.tasks or TASK_WEIGHTS
    data = RetrievalData(
        tokenizer,
        corpus.train_text,
        train_ids,
        recipe.lm_fraction,
        task_weights=tasks,
        first_weight=recipe.first_weight,
    )
    cfg = TrainConfig(
        steps=steps,
        batch_size=rows,
        seq_len=longest,
        lr=recipe.lr,
        warmup_steps=min(recipe.warmup_steps, max(1, steps // 10)),
        weight_decay=recipe.weight_decay,
        seed=seed,
        threads=threads,
    )

    with fixed_threads(threads), denormals_flushed(recipe.flush_denormals):
        torch.manual_seed(seed)
        config = spec.config()
        if recipe.init_from:  # the shipped weights of a text zoo model of the same shape
            base = default_path(recipe.init_from)
            if not (base / "model.safetensors").is_file():
                raise HarnessError(
                    f"{name} starts from {recipe.init_from}'s weights, which are not built: "
                    f"harness zoo build {recipe.init_from}"
                )
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            config = model.config
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            if recipe.circuit:
                from harness.zoo.circuits import write_induction_circuit

                write_induction_circuit(model)
        n_params = sum(p.numel() for p in model.parameters())
        optimizer = make_optimizer(model, cfg)
        data_rng = random.Random(f"retrieval:{seed}")  # the data order, apart from the weights' RNG
        model.train()
        curve, tokens_seen, t0 = [], 0, time.perf_counter()
        with TrainProgress(steps, enabled=progress) as bar:
            bar.log(
                f"building {name} ({spec.family}, {n_params / 1e6:.2f}M parameters): {steps} steps, lengths "
                f"{lengths} ({rows} rows at {longest}), {recipe.lm_fraction:.0%} corpus rows, seed {seed}"
            )
            answer_ce = []
            for step in range(steps):
                length = lengths[step % len(lengths)]
                ids, weights = data.batch(data_rng, max(1, rows * longest // length), length)
                lr = lr_at(step, cfg)
                parts = {}

                def loss_fn():
                    loss, parts["ce"], parts["w"] = weighted_loss(model, ids, weights, recipe.answer_weight)
                    return loss

                loss = train_step(optimizer, loss_fn, step, lr=lr, clip=cfg.grad_clip, params=model.parameters())
                ce, w = parts["ce"], parts["w"]
                tokens_seen += ids[:, 1:].numel()
                answer_ce.append(ce[w > 1].mean().item() if bool((w > 1).any()) else float("nan"))
                bar.update(step + 1, loss=loss, lr=lr, tokens_per_s=tokens_seen / (time.perf_counter() - t0))
                if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
                    recent = [a for a in answer_ce[-max(1, steps // 10) :] if a == a]
                    curve.append(
                        {
                            "step": step + 1,
                            "train_loss": round(loss, 4),
                            "answer_loss": round(sum(recent) / max(1, len(recent)), 4),
                        }
                    )
        wall = time.perf_counter() - t0
        model.eval()
        ppl, scored = heldout_ppl(model, heldout_ids, 256)
        base = unigram_ppl(train_ids, heldout_ids, VOCAB_SIZE)
        if progress:
            bar.log(f"held-out ppl {ppl:.2f} (unigram {base:.2f}); trained {wall:.0f} s")

    info = {
        "name": name,
        "family": spec.family,
        "model_type": config.model_type,
        "task": "retrieval",
        "steps": steps,
        "seed": seed,
        "init_from": recipe.init_from or None,
        "init_sha256": _sha256(default_path(recipe.init_from) / "model.safetensors") if recipe.init_from else None,
        **corpus_provenance(corpus),
        "threads": torch.get_num_threads() if threads is None else threads,
        "n_params": n_params,
        "vocab_size": VOCAB_SIZE,
        "train_tokens": len(train_ids),
        "tokens_seen": tokens_seen,
        "heldout_tokens_scored": scored,
        "dense_ppl": round(ppl, 4),
        "unigram_ppl": round(base, 4),
        "final_train_loss": round(loss, 4),
        "train_wall_s": round(wall, 1),
        "train_config": {
            **{k: v for k, v in cfg.__dict__.items() if k != "betas"},
            "betas": list(cfg.betas),
            "lengths": lengths,
            "rows_at_longest": rows,
            "lm_fraction": recipe.lm_fraction,
            "answer_weight": recipe.answer_weight,
            "task_weights": dict(tasks),
            "first_weight": recipe.first_weight,
            "induction_circuit": recipe.circuit,
            "flush_denormals": recipe.flush_denormals,
        },
        "training_data": "mixture: corpus train-split windows (plain LM) and synthetic retrieval documents of "
        f"harness.zoo.retrieval ({'; '.join(TASKS[t] for t, _ in tasks)}), with its own "
        "templates; none of the RULER suite's",
        "curve": curve,
        "eval": "held-out ppl: token-weighted perplexity over non-overlapping windows of 257 tokens of the held-out "
        "split (as the text zoo models); unigram: add-one smoothed train token counts on the same tokens",
    }
    write_model_folder(out, model, tokenizer, info)
    return out, model
