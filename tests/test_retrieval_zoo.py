"""The retrieval zoo models' training data (harness.zoo.retrieval) and their build."""

from __future__ import annotations

import copy
import json
import random
import re

import pytest
import torch

from harness import zoo
from harness.suites import ruler_tasks
from harness.zoo import retrieval
from harness.zoo.corpus import load_corpus
from harness.zoo.tokenizer import corpus_tokenizer

RETRIEVAL_MODELS = [n for n in zoo.list_models() if zoo.entry(n).task == "retrieval"]
RULER_PHRASES = [  # the RULER suite's own words, which no training document may use
    "special magic",
    "VAR ",
    "Memorize",
    "mentioned in the provided text",
    "variable assignment",
    *ruler_tasks.NOISE_SENTENCES,
]


@pytest.fixture(scope="module")
def data():
    corpus = load_corpus()
    tokenizer = corpus_tokenizer(corpus)
    ids = torch.tensor(tokenizer(corpus.train_text[:200_000], add_special_tokens=False)["input_ids"])
    return retrieval.RetrievalData(tokenizer, corpus.train_text, ids)


def test_there_is_a_retrieval_model_of_each_kind():
    assert {zoo.family_of(n) for n in RETRIEVAL_MODELS} >= {"llama", "deltanet", "qwen3_5"}
    for name in RETRIEVAL_MODELS:
        assert zoo.entry(name).recipe.seq_len >= 1024


def test_documents_are_answerable_and_share_no_template_with_ruler(data):
    rng = random.Random(0)
    tasks = set()
    for _ in range(300):
        make = retrieval.lookup if rng.random() < 0.7 else retrieval.binding
        doc = make(rng, data.src, rng.randint(0, 300))
        tasks.add(doc.task)
        text = doc.prompt + doc.answer
        assert not [p for p in RULER_PHRASES if p in text], text[-300:]
        answers = re.split(r", and |, | and ", doc.answer.strip())
        for answer in answers:  # every answer is said in the context, before the question
            assert answer in doc.prompt, (answer, doc.prompt[-300:])
    assert tasks == {"passkey", "lookup", "multi", "binding"}


def test_qa_documents_ask_about_every_key_and_share_no_template_with_ruler(data):
    rng = random.Random(1)
    sizes = set()
    for _ in range(200):
        doc = retrieval.qa(rng, data.src, rng.randint(0, 300))
        text = doc.context + "".join(q + a for q, a in doc.turns)
        assert not [p for p in RULER_PHRASES if p in text], text[-300:]
        sizes.add(len(doc.turns))
        for _question, answer in doc.turns:
            for value in answer.strip().split(", "):  # every answer is said in the context
                assert value in doc.context, (value, doc.context[-300:])
    assert 1 in sizes and max(sizes) >= 5  # one question to eight


def test_answers_of_several_values_are_asked_mostly_in_the_plural(data):
    rng = random.Random(3)
    plural_prefixes = tuple(prefix.split("{")[0] for _, prefix in retrieval.PLURAL_QUESTIONS)
    counts = {"plural": 0, "several": 0}
    for _ in range(300):
        for question, answer in retrieval.qa(rng, data.src, rng.randint(0, 100)).turns:
            several = len(answer.split(", ")) > 1
            plural = question.endswith(" are") or question.endswith(" They are")
            assert several or not plural, question  # one value: never "are"
            counts["several"] += several
            counts["plural"] += plural
            if plural:
                assert any(p in question for p in plural_prefixes)
    assert 0.6 < counts["plural"] / counts["several"] < 0.8  # seven times in ten


def test_qa_rows_weigh_the_first_answer_token(data):
    qa_data = copy.copy(data)  # the fixture's sources, qa documents only
    qa_data.lm_fraction, qa_data.task_weights, qa_data.first_weight = 0.0, (("qa", 1.0),), 5.0
    ids, weights = qa_data.batch(random.Random(2), 6, 256)
    for row, w in zip(ids, weights):
        firsts = (w == 5.0).nonzero().flatten().tolist()
        assert firsts, "every row answers at least one question"
        for i in firsts:  # an answer starts after its question, and the rest of it weighs ANSWER
            assert w[i - 1] == 1.0 and w[i + 1] in (retrieval.ANSWER, 1.0)


def test_the_loss_weighs_answers_as_much_as_all_the_text():
    class Fixed(torch.nn.Module):  # logits favour token 1 everywhere
        def forward(self, input_ids, use_cache=False):
            logits = torch.zeros(*input_ids.shape, 4)
            logits[..., 1] = 2.0
            return type("Out", (), {"logits": logits})()

    ids = torch.tensor([[0, 1, 1, 3, 1]])
    weights = torch.tensor([[0.0, 1.0, 1.0, 2.0, 0.0]])
    loss, ce, w = retrieval.weighted_loss(Fixed(), ids, weights, answer_weight=1.0)
    assert loss.item() == pytest.approx(ce[:2].mean().item() + ce[2].item())  # text mean + answer mean, padding out
    weights = torch.tensor([[0.0, 1.0, 5.0, 2.0, 0.0]])  # answers weigh as marked: a first token 5, the next 2
    loss, ce, w = retrieval.weighted_loss(Fixed(), ids, weights, answer_weight=1.0)
    assert loss.item() == pytest.approx(ce[0].item() + (5 * ce[1].item() + 2 * ce[2].item()) / 7)


def test_pairs_repeat_every_key_with_its_value():
    src = retrieval.Sources(["a line"], [3], ["word"] * 10, 2048, frozenset({0, 1, 2}))
    head, filler, tail, group = retrieval.pairs(random.Random(3), src, 200)
    assert len(head) == len(tail) and len(head) % group == 0 and filler[1] == 200 - 2 * len(head)
    first = {head[i]: head[i + 1] for i in range(0, len(head), group)}
    again = {tail[i]: tail[i + 1] for i in range(0, len(tail), group)}
    assert first == again and not {0, 1, 2} & set(head)


def test_mqar_rows_ask_every_key_again_on_the_suites_token_sets(data):
    """An mqar row: blocks of pairs over the mqar suite's key and value ids, each key then asked
    again and answered with the value it was last bound to (weighted as an answer); every id is a
    key, a value or noise of those sets."""
    from harness.mqar_data import tokenizer_sets

    sets = tokenizer_sets(data.tokenizer, 64, 64)
    keys, values = set(sets.keys.tolist()), set(sets.values.tolist())
    allowed = keys | values | set(sets.noise.tolist())
    for seed in range(6):
        ids, weights = data.mqar_row(random.Random(seed), 256, 256)
        assert len(ids) == len(weights) == 256 and set(ids) <= allowed
        bound, asked, bindings = {}, 0, 0
        for t, (a, b) in enumerate(zip(ids, ids[1:])):
            if a not in keys:
                continue
            assert b in values  # a key is always followed by a value
            if weights[t + 1] == retrieval.ANSWER:
                assert bound[a] == b  # a question's answer: the key's latest binding
                asked += 1
            else:
                bound[a], bindings = b, bindings + 1
        assert asked == bindings > 0 and sum(w == retrieval.ANSWER for w in weights) == asked


def test_batches_are_seeded_and_weight_answers(data):
    a_ids, a_w = data.batch(random.Random(5), 10, 256)
    b_ids, b_w = data.batch(random.Random(5), 10, 256)
    c_ids, _ = data.batch(random.Random(6), 10, 256)
    assert torch.equal(a_ids, b_ids) and torch.equal(a_w, b_w) and not torch.equal(a_ids, c_ids)
    assert a_ids.shape == a_w.shape == (10, 257)
    assert (a_w[:4] == 1).sum() == 4 * 256  # 40% corpus rows: plain LM (weight 1, first position unscored)
    assert (a_w[4:] == 2).any(dim=1).all()  # every retrieval row has answer tokens
    assert (a_w[a_ids == data.pad] == 0).all()


def test_build_writes_a_folder_that_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m"
    path, model = zoo.build_model(
        "llama-retrieval-tiny", out_dir=out, steps=2, seed=0, progress=False, batch_size=1, seq_len=64
    )
    info = json.loads((path / "zoo.json").read_text())
    assert info["task"] == "retrieval" and info["steps"] == 2 and info["train_config"]["lengths"] == [32, 32, 64]
    assert (
        "none of the RULER suite's" in info["training_data"] and "a question about every key" in info["training_data"]
    )
    assert info["init_from"] is None and info["train_config"]["induction_circuit"]
    assert info["train_config"]["first_weight"] == 5.0
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    with pytest.raises(Exception, match="seq_len must be >= 32"):
        zoo.build_model("llama-retrieval-tiny", out_dir=tmp_path / "x", steps=1, progress=False, seq_len=8)


SHIPPED_RETRIEVAL_MODELS = ("llama-retrieval-tiny", "qwen35-hybrid-retrieval-tiny")  # the DeltaNet finds no needle


@pytest.mark.parametrize("name", SHIPPED_RETRIEVAL_MODELS)
def test_shipped_retrieval_models_find_a_single_needle(name, tmp_path):
    """Known answer: a shipped retrieval model, dense, finds most of the RULER suite's single needles
    at 512 tokens (4 samples, the suite's own generator and scoring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.suite import SuiteContext
    from harness.suites.ruler import RulerSuite

    folder = zoo.default_path(name)
    assert (folder / "zoo.json").exists(), f"{name}'s weights are not in the package"
    if zoo.entry(name).needs_fla:
        zoo.prepare_fla()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ctx = SuiteContext(zoo.family_of(name), "cpu", 0, tmp_path, lambda description, total: lambda n=1: None)
    rows = RulerSuite(lengths="512", tasks="niah_single", limit=4).run(model, tokenizer, ctx)
    score = next(r.value for r in rows if r.name == "niah_single/512")
    assert score >= 50, rows


def test_shipped_retrieval_deltanet_recalls_pairs(tmp_path):
    """Known answer: the shipped retrieval DeltaNet recalls the mqar suite's pairs well above
    chance (1/64) at 4 and 8 pairs in 128 tokens, where a text-trained DeltaNet stays at chance."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.suite import SuiteContext
    from harness.suites.mqar import MqarSuite

    name = "deltanet-retrieval-tiny"
    folder = zoo.default_path(name)
    assert (folder / "zoo.json").exists(), f"{name}'s weights are not in the package"
    zoo.prepare_fla()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ctx = SuiteContext("deltanet", "cpu", 0, tmp_path, lambda description, total: lambda n=1: None)
    rows = MqarSuite(kv_pairs="4,8", seq_lens="128", limit=32).run(model, tokenizer, ctx)
    recall = next(r.value for r in rows if r.name == "acc")
    assert recall >= 0.06, rows
