"""LongBench suite: metrics on hand-computed cases, the protocol (prompts, truncation, left padding,
per-subset generation settings) through a stub model with scripted answers, and clear errors."""

from __future__ import annotations

import json
import logging
import sys
import types

import pytest
import torch

from harness.errors import HarnessError
from harness.suite import SuiteContext
from harness.suites import longbench as lb
from harness.suites.longbench import LongBenchSuite


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from harness import zoo

    return AutoTokenizer.from_pretrained(str(zoo.default_path("llama-tiny")))


def _ctx(tmp_path):
    return SuiteContext("llama", "cpu", 0, tmp_path, lambda description, total: lambda n=1: None)


class ScriptedModel(torch.nn.Module):
    """`generate` answers each prompt with the scripted text of the example whose marker it
    contains, and records what it was asked (prompt text, padding, generation settings)."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the suite a device
        self.tok, self.answers, self.calls = tokenizer, answers, []

    def generate(self, input_ids, attention_mask, max_new_tokens, **settings):
        pad = self.tok.pad_token_id
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            n_pad = int((mask == 0).sum())
            assert bool((mask[:n_pad] == 0).all()) and bool((ids[:n_pad] == pad).all())  # left padding
            prompt = self.tok.decode(ids[n_pad:], skip_special_tokens=True)
            marker = next(m for m in self.answers if m in prompt)
            self.calls.append(
                {
                    "marker": marker,
                    "prompt": prompt,
                    "max_new_tokens": max_new_tokens,
                    "batch": len(input_ids),
                    **settings,
                }
            )
            rows.append(self.tok.encode(self.answers[marker], add_special_tokens=False))
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def _example(marker, answers, *, all_classes=None, length=100, question=None):
    return {
        "input": question or f"question {marker}",
        "context": f"Document {marker} says little.",
        "answers": answers,
        "all_classes": all_classes,
        "length": length,
        "_id": marker,
    }


TREC_CLASSES = [
    "Abbreviation",
    "Animal",
    "Description of something",
    "Definition of something",
    "Other",
    "Other number",
]
# subset -> [(example, scripted model output)]; expected scores are worked out in the test below
FIXTURE = {
    "hotpotqa": [
        (_example("hq1", ["The Eiffel Tower"]), "eiffel tower, Paris"),
        (_example("hq2", ["Marie Curie", "Curie"]), "Pierre Curie"),
    ],
    "trec": [
        (_example("tr1", ["Animal"], all_classes=TREC_CLASSES), "Animal\nAbbreviation"),
        (
            _example("tr2", ["Definition of something"], all_classes=TREC_CLASSES),
            "Description of something or Definition of something",
        ),
        (_example("tr3", ["Other number"], all_classes=TREC_CLASSES), "Other number"),
    ],
    "passage_retrieval_en": [
        (_example("pr1", ["Paragraph 3"]), "Paragraph 3"),
        (_example("pr2", ["Paragraph 3"]), "Paragraph 3 or Paragraph 5"),
        (_example("pr3", ["Paragraph 3"]), "none of them"),
    ],
    "passage_count": [(_example("pc1", ["4"]), "There are 4 paragraphs, not 14")],
    "lcc": [(_example("lc1", ["return x + 1"]), "\n# comment\nreturn x + 2\n")],
    "gov_report": [(_example("gr1", ["The cat sat on the mat."]), "the cat lay on a mat")],
    "samsum": [(_example("ss1", ["Anna calls Tom tomorrow."]), "Anna will call Tom.\nTom: ok")],
    "passage_count_e": [(_example("pe1", ["4"], length=3000), "4"), (_example("pe2", ["4"], length=9000), "5")],
}


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "LongBench" / "data"
    folder.mkdir(parents=True)
    for subset, pairs in FIXTURE.items():
        (folder / f"{subset}.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex, _ in pairs))
    return folder


def _stub(tokenizer):
    return ScriptedModel(tokenizer, {ex["_id"]: out for pairs in FIXTURE.values() for ex, out in pairs})


def test_fixture_scores_match_hand_computed_values(tmp_path, data_dir, tokenizer):
    model = _stub(tokenizer)
    suite = LongBenchSuite(data_dir=str(data_dir), subsets=",".join(FIXTURE), batch_size=2)
    rows = {r.name: r.value for r in suite.run(model, tokenizer, _ctx(tmp_path))}
    expected = {
        # F1 on normalized words: {eiffel tower paris} vs {eiffel tower}: P 2/3, R 1 -> 0.8;
        # "pierre curie" vs "curie": P 1/2, R 1 -> 2/3 (beats "marie curie": 1/2)
        "hotpotqa.qa_f1": 100 * (0.8 + 2 / 3) / 2,
        # first line "Animal" -> 1; two classes named, one true -> 1/2; "Other" is a proper substring of
        # the true "Other number" and is dropped -> 1
        "trec.classification_acc": 100 * (1 + 0.5 + 1) / 3,
        "passage_retrieval_en.retrieval_acc": 100 * (1 + 0.5 + 0) / 3,  # share of numbers equal to 3
        "passage_count.count_acc": 50.0,  # numbers 4 and 14, one right
        # first line that is no comment: "return x + 2" vs "return x + 1": 2 * 11 / 24 = 91.67 -> 92 / 100
        "lcc.code_sim": 92.0,
        # words the cat lay on a mat / the cat sat on the mat: LCS 4 of 6 both ways
        "gov_report.rouge_l": 100 * 4 / 6,
        # first line "Anna will call Tom." vs "Anna calls Tom tomorrow.": LCS anna, tom: 2 of 4 both ways
        "samsum.rouge_l": 50.0,
        "passage_count_e.count_acc": 50.0,
        "passage_count_e.count_acc.0-4k": 100.0,
        "passage_count_e.count_acc.8k+": 0.0,
    }
    for name, value in expected.items():
        assert rows[name] == pytest.approx(value), name
    subset_scores = [expected[f"{s}.{lb.METRIC_OF[lb.base_subset(s)].__name__}"] for s in FIXTURE]
    assert rows["avg"] == pytest.approx(sum(subset_scores) / len(subset_scores))
    assert rows["category.synthetic"] == pytest.approx((expected["passage_retrieval_en.retrieval_acc"] + 50 + 50) / 3)
    assert rows["category.few_shot"] == pytest.approx((expected["trec.classification_acc"] + 50) / 2)
    # per-subset generation settings: LongBench's max new tokens; samsum also stops at a newline
    calls = {c["marker"]: c for c in model.calls}
    assert calls["hq1"]["max_new_tokens"] == 32 and calls["gr1"]["max_new_tokens"] == 512
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    assert calls["ss1"]["eos_token_id"] == [tokenizer.eos_token_id, newline] and calls["ss1"]["min_new_tokens"] == 1
    assert "eos_token_id" not in calls["hq1"] and calls["hq1"]["do_sample"] is False
    assert calls["hq1"]["batch"] == 2 and calls["pr3"]["batch"] == 1  # 3 retrieval examples: batches of 2, 1
    assert calls["hq1"]["prompt"] == lb.GENERIC_PROMPTS["hotpotqa"].format(**FIXTURE["hotpotqa"][0][0])


def test_prompts_and_maxlen_files_are_used(tmp_path, data_dir, tokenizer):
    config = tmp_path / "LongBench" / "config"
    config.mkdir()
    (config / "dataset2prompt.json").write_text(json.dumps({"hotpotqa": "C: {context}\nQ: {input}\nA:"}))
    (config / "dataset2maxlen.json").write_text(json.dumps({"hotpotqa": 7}))
    model = _stub(tokenizer)
    rows = LongBenchSuite(
        data_dir=str(data_dir),
        subsets="hotpotqa",
        prompts_file=str(config / "dataset2prompt.json"),
        maxlen_file=str(config / "dataset2maxlen.json"),
    ).run(model, tokenizer, _ctx(tmp_path))
    assert model.calls[0]["prompt"] == "C: Document hq1 says little.\nQ: question hq1\nA:"
    assert model.calls[0]["max_new_tokens"] == 7
    assert rows[0].details["prompts"] == "official"
    with pytest.raises(HarnessError, match="no entry for LongBench subset 'trec'"):
        LongBenchSuite(data_dir=str(data_dir), subsets="trec", prompts_file=str(config / "dataset2prompt.json")).run(
            model, tokenizer, _ctx(tmp_path)
        )


def test_chat_template_is_applied_except_on_few_shot_and_code(tokenizer):
    import copy

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    suite = LongBenchSuite(chat_template=True)
    assert chat.decode(suite._encode("Q?", "hotpotqa", chat)) == "User: Q?\nAssistant:"
    assert chat.decode(suite._encode("Q?", "trec", chat)) == "Q?"  # LongBench keeps few-shot prompts raw
    with pytest.raises(HarnessError, match="no chat template"):
        suite._encode("Q?", "hotpotqa", tokenizer)


def test_truncation_keeps_both_ends(tokenizer):
    prompt = "HEAD marker. " + "filler words go here. " * 300 + "TAIL question?"
    cut = lb.truncate_middle(prompt, tokenizer, 40)
    assert cut.startswith("HEAD marker.") and cut.endswith("TAIL question?")
    assert len(tokenizer(cut)["input_ids"]) <= 42 < len(tokenizer(prompt)["input_ids"])
    ids = tokenizer(prompt)["input_ids"]
    assert cut == tokenizer.decode(ids[:20], skip_special_tokens=True) + tokenizer.decode(
        ids[-20:], skip_special_tokens=True
    )
    assert lb.truncate_middle("short prompt", tokenizer, 40) == "short prompt"


def test_metric_edge_cases_by_hand():
    # LongBench's removal loop skips the element after a removed one: "Oth" survives here -> 1/2
    assert lb.classification_acc("Other number", "Other number", all_classes=["Other", "Oth", "Other number"]) == 0.5
    assert lb.classification_acc("nothing", "Animal", all_classes=["Animal"]) == 0.0
    assert lb.qa_f1("The answer.", "an answer") == 1.0  # articles and punctuation are normalized away
    assert lb.qa_f1("", "x") == 0.0 and lb.rouge_l("", "x") == 0.0
    assert lb.retrieval_acc("no digits", "Paragraph 2") == 0.0
    assert lb.code_sim("```python\n// c\nx = 1", "x = 1") == 1.0  # fences and comments are skipped
    assert lb.example_score("triviaqa", "\nParis\nLondon", ["London"], None) == 0.0  # first line only


def test_chinese_metrics_with_segmentation(monkeypatch):
    # a stand-in for jieba that cuts into characters, so the values are computable by hand
    monkeypatch.setitem(sys.modules, "jieba", types.SimpleNamespace(cut=lambda text, cut_all=False: list(text)))
    # 北京是首都 vs 北京 (punctuation dropped): 2 common of 5 and 2 -> F1 = 2 * 0.4 * 1 / 1.4
    assert lb.qa_f1_zh("北京是首都。", "北京") == pytest.approx(2 * 0.4 / 1.4)
    assert lb.rouge_l_zh("我爱北京", "我爱上海") == pytest.approx(0.5)
    assert lb.retrieval_acc_zh("段落3", "段落3") == 1.0
    monkeypatch.setitem(sys.modules, "jieba", None)  # not installed
    with pytest.raises(HarnessError, match="pip install jieba"):
        lb.qa_f1_zh("a", "b")


@pytest.mark.parametrize("model_name", ["llama-tiny", "deltanet-tiny"])
def test_left_padded_batches_equal_single_prompts(model_name):
    from harness.loader import load_model

    loaded = load_model(model_name)
    tok = loaded.tokenizer
    prompts = [
        tok(p)["input_ids"]
        for p in ("Return the value of the attribute named by the key", "Parse a string", "Create a new")
    ]
    batched = lb.generate_batch(loaded.model, tok, prompts, 6, stop_at_newline=False)
    singles = [lb.generate_batch(loaded.model, tok, [p], 6, stop_at_newline=False)[0] for p in prompts]
    assert batched == singles and all(singles)


def test_no_data_dir_gives_no_rows_and_says_so(tmp_path, tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        assert LongBenchSuite().run(_stub(tokenizer), tokenizer, _ctx(tmp_path)) == []
    assert "no data_dir" in caplog.text and "THUDM/LongBench" in caplog.text


def test_missing_files_are_one_line_errors(tmp_path, data_dir):
    with pytest.raises(HarnessError) as err:
        LongBenchSuite(data_dir=str(data_dir), subsets="hotpotqa,qasper")
    assert str(data_dir / "qasper.jsonl") in str(err.value) and "THUDM/LongBench" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(HarnessError, match="is not a folder"):
        LongBenchSuite(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown LongBench subset 'nosuch'"):
        LongBenchSuite(subsets="nosuch")
    assert LongBenchSuite(subsets="en").subset_names() == [s for s in lb.ALL_SUBSETS if s not in lb.CHINESE]
    assert len(LongBenchSuite(subsets="all").subset_names()) == 21
    assert len(LongBenchSuite(subsets="e").subset_names()) == 13
