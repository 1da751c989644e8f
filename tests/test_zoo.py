"""The zoo: corpus, tokenizer, builds of each family, and the shipped weights."""

from __future__ import annotations

import json

import pytest
import torch

from harness import zoo
from harness.zoo import corpus as corpus_mod
from harness.zoo.corpus import SKIP_DIRS, build_corpus, load_corpus
from harness.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, corpus_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


# ---------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_splits_are_disjoint(corpus):
    again = build_corpus()  # a fresh read of every stdlib file, not the memoized copy
    assert again.sha256 == corpus.sha256
    assert again.train_text == corpus.train_text and again.heldout_text == corpus.heldout_text

    train_paths = [d.path for d in corpus.train_docs]
    heldout_paths = [d.path for d in corpus.heldout_docs]
    assert not set(train_paths) & set(heldout_paths)
    assert train_paths == sorted(train_paths) and heldout_paths == sorted(heldout_paths)
    assert all(corpus_mod.is_heldout(p) for p in heldout_paths)
    assert not any(corpus_mod.is_heldout(p) for p in train_paths)
    assert corpus.n_heldout_docs >= 5 and 0.02 < corpus.n_heldout_docs / corpus.n_docs < 0.10
    assert len(corpus.train_text) > 500_000 and len(corpus.heldout_text) > 20_000
    for path in train_paths + heldout_paths:
        assert not set(path.split("/")) & SKIP_DIRS, path
    assert corpus.python_version.count(".") == 2
    assert "Python Software Foundation" in corpus_mod.__doc__ and "PSF License" in corpus_mod.__doc__


def test_corpus_cache_dir_only_writes_there(tmp_path, corpus):
    cached = load_corpus(cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"
    reread = load_corpus(cache_dir=tmp_path)  # from the JSON copy
    assert reread.sha256 == cached.sha256 == corpus.sha256
    assert reread.heldout_text == corpus.heldout_text and reread.train_text == corpus.train_text
    assert zoo.heldout_text() == corpus.heldout_text


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_reload(tmp_path, corpus):
    from transformers import AutoTokenizer

    tok = corpus_tokenizer(corpus)
    assert len(tok) == VOCAB_SIZE
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    text = corpus.heldout_text[:20_000] + "\n\tunicode: déjà vu, 数据, emoji \U0001f600  trailing  \n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: exact round trip, no unknown tokens
    assert len(ids) < len(text) / 2.5  # it did learn merges

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)


def test_tokenizer_training_is_deterministic():
    docs = [
        f"Return the {w} of the {v} object, or None when it has no {w}.\n" * 3
        for w in ("name", "value", "length", "parent")
        for v in ("socket", "file", "thread")
    ]
    a = train_tokenizer(docs, vocab_size=300)
    b = train_tokenizer(reversed(docs), vocab_size=300)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


# ---------------------------------------------------------------- builds


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


TEXT_MODELS = [n for n in zoo.list_models() if zoo.get(n).task == "text"]  # the MQAR model: tests/test_mqar.py


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_build_writes_a_folder_the_real_loaders_reload(name, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / name
    path, model = zoo.build_model(name, out_dir=out, steps=3, seed=0, progress=False, batch_size=2, seq_len=32)
    assert path == out
    assert {"config.json", "model.safetensors", "tokenizer.json", "zoo.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftover temporary folder

    info = json.loads((out / "zoo.json").read_text())
    assert info["name"] == name and info["family"] == zoo.family_of(name)
    assert info["steps"] == 3 and info["seed"] == 0
    assert info["corpus_sha256"] == load_corpus().sha256
    for key in ("python_version", "torch_version", "dense_ppl", "unigram_ppl", "train_wall_s"):
        assert key in info
    assert info["dense_ppl"] > 1 and info["unigram_ppl"] > 1
    assert zoo.manifest(out) == info

    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}

    if zoo.entry(name).needs_fla:
        zoo.prepare_fla()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("Return the lowest index in the list where the value is found.")["input_ids"]])
    assert torch.equal(_logits(model.eval(), ids), _logits(reloaded, ids))

    # the key dimension the harness prunes: 4 heads of 32 channels
    cfg = reloaded.config
    assert cfg.vocab_size == VOCAB_SIZE and cfg.num_hidden_layers == 4 and cfg.hidden_size == 128
    head_k = cfg.head_dim if name != "deltanet-tiny" else int(cfg.hidden_size * cfg.expand_k) // cfg.num_heads
    assert head_k == 32


def test_build_is_deterministic_under_a_seed(tmp_path):
    a = zoo.build("llama-tiny", out_dir=tmp_path / "a", steps=3, seed=1, progress=False, batch_size=2, seq_len=32)
    b = zoo.build("llama-tiny", out_dir=tmp_path / "b", steps=3, seed=1, progress=False, batch_size=2, seq_len=32)
    c = zoo.build("llama-tiny", out_dir=tmp_path / "c", steps=3, seed=2, progress=False, batch_size=2, seq_len=32)
    weights = [(p / "model.safetensors").read_bytes() for p in (a, b, c)]
    assert weights[0] == weights[1] and weights[0] != weights[2]


def test_build_refuses_to_overwrite_a_folder_that_is_not_a_model(tmp_path):
    from harness.errors import HarnessError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(HarnessError, match="not empty"):
        zoo.build("llama-tiny", out_dir=tmp_path, steps=1, progress=False)
    with pytest.raises(HarnessError, match="unknown zoo model"):
        zoo.build("gpt-tiny", out_dir=tmp_path / "x", steps=1, progress=False)


# ---------------------------------------------------------------- shipped weights


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_shipped_weights_beat_the_unigram_baseline(name, corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.zoo.train import heldout_ppl

    folder = zoo.default_path(name)
    if not (folder / "zoo.json").exists():
        pytest.skip(f"{name} has no shipped weights (build them with `harness zoo build {name}`)")
    info = zoo.manifest(name)
    assert info["name"] == name and info["family"] == zoo.family_of(name)
    assert info["dense_ppl"] < 0.5 * info["unigram_ppl"]
    assert (folder / "model.safetensors").stat().st_size < 9 << 20

    if zoo.entry(name).needs_fla:
        zoo.prepare_fla()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor(tok(corpus.heldout_text, add_special_tokens=False)["input_ids"])
    ppl, scored = heldout_ppl(model, ids, seq_len=info["train_config"]["seq_len"])
    assert ppl < info["unigram_ppl"]
    if info["corpus_sha256"] == corpus.sha256:  # the same held-out text as at build time
        assert scored == info["heldout_tokens_scored"]
        assert ppl == pytest.approx(info["dense_ppl"], rel=2e-3)


def test_denormals_are_flushed_only_inside_the_context():
    from harness.zoo.train import denormals_flushed

    tiny = torch.tensor([1e-40])  # below float32's smallest normal number (1.2e-38)
    assert (tiny * 1.0).item() != 0.0
    with denormals_flushed(True):
        assert (tiny * 1.0).item() == 0.0
    assert (tiny * 1.0).item() != 0.0
    with denormals_flushed(False):
        assert (tiny * 1.0).item() != 0.0
