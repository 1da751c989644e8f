"""lm-eval suite: the local tasks are well-formed, lm-eval's numbers reach our rows unchanged, the
perplexity through lm-eval equals the ppl suite's on aligned windows, and missing datasets fail
in one line without touching the network."""

from __future__ import annotations

import json
import math
import re
import socket
from pathlib import Path

import pytest
from lm_eval.api.model import LM

from harness.calibration import load_text
from harness.errors import HarnessError
from harness.suite import SuiteContext
from harness.suites.lm_eval import (
    CHOICE_TASK,
    PPL_TASK,
    TASKS_DIR,
    LmEvalSuite,
    continuation_items,
    evaluate_tasks,
    hub_access,
    load_tasks,
    split_documents,
    write_local_data,
)


def _ctx(tmp_path, family="deltanet"):
    return SuiteContext(family, "cpu", 0, tmp_path / "artifacts", lambda description, total: lambda n=1: None)


class ScriptedLM(LM):
    """An lm-eval LM whose scores come from a rule (an oracle, a position-biased guesser, a
    character-count perplexity), so every metric has a value computable by hand."""

    def __init__(self, score_choice=None):
        super().__init__()
        self.score_choice = score_choice

    def loglikelihood(self, requests, disable_tqdm=False):
        return [(self.score_choice(*r.args), False) for r in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        return [-float(len(r.args[0])) for r in requests]  # nll of a document = its characters

    def generate_until(self, requests, disable_tqdm=False):
        raise AssertionError("no generation task here")

    def tok_encode(self, text):  # "tokens" = whitespace words, for token_perplexity
        return text.split()


def _items(folder):
    return [json.loads(line) for line in (folder / f"{CHOICE_TASK}.jsonl").read_text().splitlines()]


def test_continuation_items_are_well_formed():
    text = load_text(None, split="heldout")
    documents = split_documents(text)
    items = continuation_items(text, n_choices=4, seed=0)
    assert len(items) > 200
    flat = [re.sub(r"\s+", " ", d) for d in documents]
    for item in items:
        choices, label = item["choices"], item["label"]
        assert len(choices) == 4 and len(set(choices)) == 4 and 0 <= label < 4
        sentence = item["context"] + " " + choices[label]
        home = [i for i, d in enumerate(flat) if sentence in d]
        assert home, sentence  # the gold choice really continues the context in the corpus
        for j, wrong in enumerate(choices):
            if j != label:  # distractors come from other documents
                assert not any(item["context"] + " " + wrong in flat[i] for i in home)
    # gold positions are spread, so a position-biased scorer cannot pass
    assert {i["label"] for i in items} == {0, 1, 2, 3}
    assert continuation_items(text, seed=0) == items and continuation_items(text, seed=1) != items


def test_oracle_gets_one_and_position_guesser_gets_its_share(tmp_path):
    write_local_data(tmp_path, load_text(None, split="heldout"), n_choices=4, seed=0)
    items = _items(tmp_path)[:60]
    truth = {(i["context"], " " + i["choices"][i["label"]]) for i in items}
    position = {(i["context"], " " + c): k for i in items for k, c in enumerate(i["choices"])}

    oracle = ScriptedLM(lambda context, choice: 0.0 if (context, choice) in truth else -5.0)
    rows = {r.name: r.value for r in evaluate_tasks(oracle, [CHOICE_TASK], data_dir=tmp_path, limit=60)}
    assert rows[f"{CHOICE_TASK}.acc"] == 1.0 and rows[f"{CHOICE_TASK}.acc_norm"] == 1.0
    assert rows["avg_acc"] == 1.0

    first = ScriptedLM(lambda context, choice: -float(position[(context, choice)]))  # always picks choice 0
    rows = {r.name: r.value for r in evaluate_tasks(first, [CHOICE_TASK], data_dir=tmp_path, limit=60)}
    expected = sum(i["label"] == 0 for i in items) / len(items)
    assert rows[f"{CHOICE_TASK}.acc"] == pytest.approx(expected) and 0 < expected < 0.5


def test_perplexity_rows_are_lm_evals_numbers(tmp_path):
    counts = write_local_data(tmp_path, load_text(None, split="heldout"))
    docs = [json.loads(line)["text"] for line in (tmp_path / f"{PPL_TASK}.jsonl").read_text().splitlines()]
    assert counts[PPL_TASK] == len(docs) == 20
    rows = {r.name: r for r in evaluate_tasks(ScriptedLM(), [PPL_TASK], data_dir=tmp_path, limit=5)}
    nll = sum(len(d) for d in docs[:5])  # the scripted model's nll of a document = its characters
    words = sum(len(re.split(r"\s+", d)) for d in docs[:5])
    n_bytes = sum(len(d.encode("utf-8")) for d in docs[:5])
    assert rows[f"{PPL_TASK}.word_perplexity"].value == pytest.approx(math.exp(nll / words))
    assert rows[f"{PPL_TASK}.byte_perplexity"].value == pytest.approx(math.exp(nll / n_bytes))
    assert rows[f"{PPL_TASK}.bits_per_byte"].value == pytest.approx(nll / n_bytes / math.log(2))
    assert rows[f"{PPL_TASK}.bits_per_byte"].unit == "bits/byte"
    token = rows[f"{PPL_TASK}.token_perplexity"]
    assert token.value == pytest.approx(math.exp(nll / sum(len(d.split()) for d in docs[:5])))
    assert token.details["docs"] == 5 and "avg_acc" not in rows


@pytest.mark.parametrize("model_name", ["deltanet-tiny", "llama-tiny"])
def test_lm_eval_perplexity_equals_ppl_suite(tmp_path, model_name):
    """lm-eval's rolling windows (max_length L) predict tokens [0, L), [L, 2L), ... of a document,
    the first from BOS, each later window with the previous window's last token as its only
    context. The ppl suite reproduces that exactly on the text "<bos>" + document with
    seq_len = L + 1 and stride = L when the document's token count is a multiple of L (so
    lm-eval's last window is full too): same tokens, same contexts, so the perplexities agree to
    float32 rounding (batching and chunk boundaries differ): rtol 1e-4."""
    from harness.loader import load_model
    from harness.suites.ppl import PerplexitySuite

    loaded = load_model(model_name)
    tok, window = loaded.tokenizer, 64
    text = split_documents(load_text(None, split="heldout"))[1][:1200]  # ~400 tokens
    while len(tok(text, add_special_tokens=False)["input_ids"]) % window:  # whole windows only
        text = text[:-1].rstrip()
    n_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
    assert n_tokens >= 3 * window
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
    (tmp_path / "bos_doc.txt").write_text(tok.bos_token + text, encoding="utf-8")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok(tok.bos_token + text, add_special_tokens=False)["input_ids"] == [tok.bos_token_id] + ids

    suite = LmEvalSuite(tasks=PPL_TASK, text_file=str(tmp_path / "doc.txt"), max_length=window, limit=0)
    rows = {r.name: r for r in suite.run(loaded.model, tok, _ctx(tmp_path, loaded.family))}
    ppl_suite = PerplexitySuite(seq_len=window + 1, stride=window, limit=0, text_file=str(tmp_path / "bos_doc.txt"))
    ppl = {r.name: r for r in ppl_suite.run(loaded.model, tok, _ctx(tmp_path))}
    token = rows[f"{PPL_TASK}.token_perplexity"]
    assert token.details["tokens"] == ppl["ppl"].details["tokens"] == n_tokens
    assert token.value == pytest.approx(ppl["ppl"].value, rel=1e-4)
    # lm-eval's own word perplexity is the same log-likelihood over a different count
    words = len(re.split(r"\s+", text))
    expected_word_ppl = math.exp(ppl["nll"].value * n_tokens / words)
    assert rows[f"{PPL_TASK}.word_perplexity"].value == pytest.approx(expected_word_ppl, rel=1e-3)


def test_default_run_beats_chance_and_writes_nothing_outside_artifacts(tmp_path, monkeypatch, capfd):
    from harness.loader import load_model

    loaded = load_model("llama-tiny")
    monkeypatch.chdir(tmp_path)
    rows = {r.name: r for r in LmEvalSuite().run(loaded.model, loaded.tokenizer, _ctx(tmp_path, loaded.family))}
    printed = capfd.readouterr()
    assert "it/s" not in printed.err + printed.out  # lm-eval's own tqdm bars stay quiet (the suite has its bar)
    import lm_eval.models.huggingface as hf_module
    from tqdm import tqdm

    assert hf_module.tqdm is tqdm  # and are restored after the run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]  # no caches in the working folder
    assert sorted((tmp_path / "artifacts" / "lm_eval_data").iterdir())  # the task rows stay with the run
    acc = rows[f"{CHOICE_TASK}.acc"]
    assert acc.details["docs"] == 100
    assert acc.value > 0.25 + 2 * acc.details["stderr"]  # 4 choices: chance is 0.25
    assert 20 < rows[f"{PPL_TASK}.token_perplexity"].value < 100  # zoo.json: dense ppl about 51
    assert rows[f"{PPL_TASK}.token_perplexity"].details["docs"] == 20


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_missing_dataset_is_one_line_error_without_network(tmp_path, no_network):
    import datasets.config
    import huggingface_hub.constants
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    before = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    with hub_access(allow_download=False):
        # lm-eval's own wikitext config, indexed alone (all ~10k built-in YAMLs take many seconds)
        wikitext = Path(lm_eval.tasks.__file__).parent / "wikitext"
        manager = TaskManager(include_path=[str(TASKS_DIR), str(wikitext)], include_defaults=False)
        with pytest.raises(HarnessError) as err:
            load_tasks(["wikitext"], manager)
        with pytest.raises(HarnessError, match="unknown lm-eval task 'no_such_task'"):
            load_tasks([PPL_TASK, "no_such_task"], manager)
    message = str(err.value)
    assert "\n" not in message and "'wikitext'" in message and "EleutherAI/wikitext_document_level" in message
    assert "allow_download" in message and no_network == []
    assert (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before  # restored


def test_parameters_are_validated():
    for bad in ({"tasks": " , "}, {"limit": -1}, {"choices": 1}, {"batch_size": 0}, {"num_fewshot": -2}):
        with pytest.raises(ValueError):
            LmEvalSuite(**bad)
    assert LmEvalSuite(tasks="a, b").task_names() == ["a", "b"]
