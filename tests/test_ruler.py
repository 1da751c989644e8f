"""ruler: generated tasks are answerable from their prompts alone, fit their lengths, are seeded;
RULER's string-match scoring; a perfect oracle scores 100 and a random generator about 0; every
family generates through left-padded batches exactly as one prompt at a time."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from harness import zoo
from harness.suite import SuiteContext
from harness.suites import ruler_tasks
from harness.suites.ruler import RulerSuite, generate_continuations, postprocess, string_match_all, string_match_part

WORDS = (
    "apple river stone cloud paper light water sound table glass music field house night green quick "
    "silver market garden window letter bridge forest signal pocket little yellow simple common winter "
    "summer travel number system button corner dinner father mother camera circle doctor engine family "
    "friend hunter island jacket kitchen ladder master needle orange parent rabbit record rocket sister "
    "spring ticket valley wonder animal basket bottle carpet castle cotton desert finger flower hammer "
    "helmet jungle kettle lemon magnet meadow mirror monkey nature office palace pepper pillow planet "
    "powder puzzle rainbow saddle shadow shovel spider statue sunset tunnel turtle velvet violin wallet "
    "walnut weather whistle wizard"
).split()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(zoo.default_path("deltanet-tiny")))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    """A small haystack of plain sentences (the embedded corpus takes seconds to build)."""
    gen = torch.Generator().manual_seed(0)
    sentences = []
    for _ in range(600):
        n = int(torch.randint(4, 12, (1,), generator=gen))
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=gen)]
        sentences.append(" ".join(words).capitalize() + ".")
    path = tmp_path_factory.mktemp("hay") / "hay.txt"
    path.write_text(" ".join(sentences), encoding="utf-8")
    return str(path)


def ctx(seed: int = 0, artifacts: Path | None = None) -> SuiteContext:
    return SuiteContext("deltanet", "cpu", seed, artifacts, lambda description, total: lambda n=1: None)


def solve(prompt: str) -> list[str]:
    """The answer of a RULER prompt, worked out from the prompt text alone."""
    if prompt.startswith(("Some special magic", "A special magic")):
        needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", prompt)
        query = re.search(r"What (?:are all|is) the special magic numbers? for (.+?) mentioned", prompt).group(1)
        keys = re.split(r", and |, ", query)
        return [value for key in keys for name, value in needles if name == key]
    if prompt.startswith("Memorize and track"):
        value = re.search(r"assigned the value (\d+) in the text above", prompt).group(1)
        assignments = re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)", prompt)
        found, names = {value}, []
        while True:
            new = [n for n, source in assignments if source.removeprefix("VAR ") in found and n not in found]
            if not new:
                return names
            found.update(new)
            names += new
    if "numbered list of words" in prompt:
        entries = re.findall(r"\d+\. ([a-z]+)", prompt.split("\n")[1])
        k = int(re.search(r"What are the (\d+) most common", prompt).group(1))
        ranked = Counter(entries).most_common()
        assert ranked[k - 1][1] > ranked[k][1], "the common words must be unambiguous"
        return [w for w, _ in ranked[:k]]
    if "coded text" in prompt:
        context = prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0]
        ranked = Counter(w for w in context.split() if w != "...").most_common()
        assert ranked[2][1] > ranked[3][1], "the three frequent words must be unambiguous"
        return [w for w, _ in ranked[:3]]
    raise AssertionError(f"not a RULER prompt: {prompt[:80]!r}")


class OracleModel:
    """Reads each left-padded prompt and answers it by `solve`; greedy-only, like the suite asks."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def parameters(self):
        return iter(())

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, **kwargs):
        assert do_sample is False
        replies = []
        for ids, mask in zip(input_ids, attention_mask):
            assert mask.tolist() == sorted(mask.tolist()), "padding must be on the left"
            prompt = self.tokenizer.decode(ids[mask.bool()].tolist())
            reply = self.tokenizer(" " + ", ".join(solve(prompt)) + ".", add_special_tokens=False)["input_ids"]
            assert len(reply) <= max_new_tokens, "the generation budget must hold a perfect answer"
            replies.append(reply + [self.tokenizer.eos_token_id] * (max_new_tokens - len(reply)))
        return torch.cat([input_ids, torch.tensor(replies, dtype=torch.long)], dim=1)


class RandomModel:
    def __init__(self, vocab_size: int, seed: int = 0):
        self.vocab_size, self.gen = vocab_size, torch.Generator().manual_seed(seed)

    def parameters(self):
        return iter(())

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, **kwargs):
        new = torch.randint(3, self.vocab_size, (len(input_ids), max_new_tokens), generator=self.gen)
        return torch.cat([input_ids, new], dim=1)


# ---------------------------------------------------------------- scoring


def test_string_match_follows_ruler():
    answers = ["1234567", "Apple", "9999999"]
    assert string_match_all("the numbers are 1234567 and apple.", answers) == pytest.approx(2 / 3)
    assert string_match_part("the numbers are 1234567 and apple.", answers) == 1.0
    assert string_match_all("nothing here", answers) == 0.0 and string_match_part("nothing", answers) == 0.0
    assert string_match_all("APPLE 1234567 9999999", answers) == 1.0  # case-insensitive substring
    assert postprocess("  \t 123\x01456\x1f \n") == "123\n456"


# ---------------------------------------------------------------- generation of the tasks


def test_every_task_is_answerable_fits_its_length_and_round_trips(tokenizer, text_file):
    suite = RulerSuite(lengths="384,768", tasks="all", limit=3, text_file=text_file)
    samples = suite.samples(tokenizer, seed=0)
    assert Counter((s.task, s.length) for s in samples) == {(t, n): 3 for t in ruler_tasks.TASKS for n in (384, 768)}
    for s in samples:
        assert sorted(solve(s.prompt)) == sorted(s.answers), (s.task, s.length, s.index)
        ids = tokenizer(s.prompt)["input_ids"]
        assert len(ids) == s.prompt_tokens and s.prompt_tokens + s.max_new_tokens <= s.length
        assert s.prompt_tokens + s.max_new_tokens > 0.75 * s.length, (s.task, s.prompt_tokens)  # the haystack is filled
        assert tokenizer.decode(ids) == s.prompt  # needles (numbers, words, names) survive the tokenizer
        for answer in s.answers:
            assert tokenizer.decode(tokenizer(" " + answer)["input_ids"]) == " " + answer
    by_task = {s.task: s for s in samples if s.length == 768}
    assert len(by_task["niah_multivalue"].answers) == 4 and len(by_task["niah_multiquery"].answers) == 4
    assert len(by_task["niah_single"].answers) == 1 and by_task["niah_single"].prompt.startswith("A special magic")
    assert len(by_task["vt"].answers) == 5 and len(by_task["fwe"].answers) == 3
    assert len(by_task["cwe"].answers) == ruler_tasks.cwe_common(768) == 6


def test_the_default_task_set_leaves_out_the_aggregation_tasks():
    from harness.suites.ruler import DEFAULT_TASKS

    assert RulerSuite().task_list() == list(DEFAULT_TASKS) == [t for t in ruler_tasks.TASKS if t not in ("cwe", "fwe")]
    assert RulerSuite(tasks="all").task_list() == list(ruler_tasks.TASKS)


def test_samples_are_seeded_and_limit_only_adds(tokenizer, text_file):
    one = RulerSuite(lengths="384", tasks="niah_multikey,cwe", limit=2, text_file=text_file).samples(tokenizer, 7)
    again = RulerSuite(lengths="384", tasks="niah_multikey,cwe", limit=3, text_file=text_file).samples(tokenizer, 7)
    other = RulerSuite(lengths="384", tasks="niah_multikey,cwe", limit=2, text_file=text_file).samples(tokenizer, 8)
    assert [s.prompt for s in one] == [s.prompt for s in again if s.index < 2]
    assert not {s.prompt for s in one} & {s.prompt for s in other}


def test_bad_parameters_and_too_short_lengths_are_clear(tokenizer, text_file):
    with pytest.raises(ValueError, match="unknown task 'niah'"):
        RulerSuite(tasks="niah")
    with pytest.raises(ValueError, match=">= 64"):
        RulerSuite(lengths="32")
    with pytest.raises(ValueError, match="integers"):
        RulerSuite(lengths="long")
    with pytest.raises(ValueError, match="limit"):
        RulerSuite(limit=0)
    with pytest.raises(ValueError, match="too short for niah_multiquery"):
        RulerSuite(lengths="128", tasks="niah_multiquery", text_file=text_file).samples(tokenizer, 0)


# ---------------------------------------------------------------- known answers through the suite


def test_oracle_scores_100_and_random_about_0(tokenizer, text_file, tmp_path):
    suite = RulerSuite(lengths="512", tasks="all", limit=2, batch_size=3, text_file=text_file)
    rows = {m.name: m for m in suite.run(OracleModel(tokenizer), tokenizer, ctx(artifacts=tmp_path))}
    cells = [m for m in rows.values() if m.details["scope"] == "task_length"]
    assert len(cells) == len(ruler_tasks.TASKS)
    assert all(m.value == 100.0 and m.details["string_match_part"] == 100.0 for m in cells)
    assert rows["avg"].value == 100.0 and rows["avg/512"].value == 100.0 and rows["vt"].value == 100.0
    saved = (tmp_path / "ruler_predictions.jsonl").read_text().splitlines()
    assert len(saved) == 2 * len(ruler_tasks.TASKS)

    rows = {m.name: m for m in suite.run(RandomModel(len(tokenizer)), tokenizer, ctx())}
    assert rows["avg"].value < 5.0


# ---------------------------------------------------------------- every family, the real generate


def _tiny(family: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from conftest import tiny_config

    common = dict(
        vocab_size=2048,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "llama":
        config = LlamaConfig(**common)
    elif family == "qwen2":
        config = Qwen2Config(**common)
    else:
        config = tiny_config(family, vocab_size=2048, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["deltanet", "gated_deltanet", "llama", "qwen2"])
def test_every_family_generates_left_padded_batches_like_single_prompts(family, tokenizer, text_file):
    model = _tiny(family)
    prompts = [
        "One of the special magic numbers for apple-river is: 1234567.",
        "The sky is blue. " * 9 + "VAR",
        "def f(x):",
    ]
    batched = generate_continuations(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_continuations(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single and all(batched)
    suite = RulerSuite(lengths="256", tasks="niah_single", limit=1, max_new_tokens=8, text_file=text_file)
    rows = suite.run(model, tokenizer, ctx())
    assert {m.name for m in rows} == {"niah_single/256", "niah_single", "avg/256", "avg"}
    assert all(0.0 <= m.value <= 100.0 for m in rows)
