"""mqar: the sequences follow Zoology's layout; a perfect associative-recall oracle scores 1 and a
random model scores about 1 / num_values; every family runs through its teacher-forced logits;
the shipped MQAR zoo model recalls far above chance."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harness import zoo
from harness.suite import SuiteContext
from harness.mqar_data import mqar_batch, token_sets
from harness.suites.mqar import MqarSuite

VOCAB = 2048
SPECIAL = (0, 1, 2)


def ctx(seed: int = 0) -> SuiteContext:
    return SuiteContext("deltanet", "cpu", seed, None, lambda description, total: lambda n=1: None)


class TokenizerStub:
    """What the suite reads from a tokenizer: its size and special ids."""

    all_special_ids = list(SPECIAL)

    def __len__(self):
        return VOCAB


class RecallOracle:
    """At each position, all logit mass on the token that followed the last earlier occurrence of
    the current token: perfect associative recall, with no knowledge of the task."""

    def parameters(self):
        return iter(())

    def __call__(self, input_ids, **kwargs):
        B, L = input_ids.shape
        earlier = torch.ones(L, L, dtype=torch.bool).tril(-1)  # [t, s]: s < t
        same = (input_ids[:, :, None] == input_ids[:, None, :]) & earlier
        last = (same * torch.arange(1, L + 1)).argmax(-1)  # latest matching s (0 if none)
        found = same.any(-1)
        following = input_ids.gather(1, (last + 1).clamp(max=L - 1))
        logits = torch.zeros(B, L, VOCAB)
        logits[found] = logits[found].scatter(-1, following[found][:, None], 1.0)
        return SimpleNamespace(logits=logits)


class RandomLogits:
    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)

    def parameters(self):
        return iter(())

    def __call__(self, input_ids, **kwargs):
        return SimpleNamespace(logits=torch.randn(*input_ids.shape, VOCAB, generator=self.gen))


def test_token_sets_are_disjoint_and_skip_special_ids():
    sets = token_sets(VOCAB, SPECIAL, 64, 32)
    keys, values, noise = (set(t.tolist()) for t in (sets.keys, sets.values, sets.noise))
    assert len(keys) == 64 and len(values) == 32 and len(noise) == VOCAB - 3 - 96
    assert not keys & values and not keys & noise and not values & noise and not (keys | values | noise) & set(SPECIAL)
    with pytest.raises(ValueError, match="too small"):
        token_sets(100, SPECIAL, 64, 64)


def test_sequences_follow_the_layout():
    sets = token_sets(VOCAB, SPECIAL, 64, 64)
    n, length = 8, 64
    batch = mqar_batch(sets, 32, n, length, np.random.default_rng(0))
    again = mqar_batch(sets, 32, n, length, np.random.default_rng(0))
    assert torch.equal(batch.input_ids, again.input_ids) and batch.input_ids.shape == (32, length)
    keys, values, noise = (set(t.tolist()) for t in (sets.keys, sets.values, sets.noise))
    for ids, positions, answers in zip(
        batch.input_ids.tolist(), batch.query_positions.tolist(), batch.answers.tolist()
    ):
        pairs = dict(zip(ids[0 : 2 * n : 2], ids[1 : 2 * n : 2]))
        assert len(pairs) == n and set(pairs) <= keys and set(pairs.values()) <= values
        assert len(set(pairs.values())) == n  # distinct values, as Zoology
        assert sorted(ids[p] for p in positions) == sorted(pairs)  # each key asked once, after the pairs
        assert all(p >= 2 * n and (p - 2 * n) % 2 == 0 for p in positions)
        assert [pairs[ids[p]] for p in positions] == answers
        rest = [t for i, t in enumerate(ids[2 * n :], 2 * n) if i not in positions]
        assert set(rest) <= noise
    # Zoology's power law puts most queries right after the pairs
    gaps = (batch.query_positions - 2 * n) // 2
    assert (gaps < 8).float().mean() > 0.3
    with pytest.raises(ValueError, match="at least 64"):
        mqar_batch(sets, 1, 16, 63, np.random.default_rng(0))


def test_oracle_is_perfect_and_random_is_at_chance():
    suite = MqarSuite(kv_pairs="4,16", seq_lens="64,128", limit=32, batch_size=8)
    assert suite.settings() == [(4, 64), (4, 128), (16, 64), (16, 128)]
    rows = {m.name: m for m in suite.run(RecallOracle(), TokenizerStub(), ctx())}
    assert set(rows) == {
        "acc/kv4/len64",
        "acc/kv4/len128",
        "acc/kv16/len64",
        "acc/kv16/len128",
        "acc/kv4",
        "acc/kv16",
        "acc",
    }
    assert all(m.value == 1.0 for m in rows.values())
    assert rows["acc/kv16/len128"].details["queries"] == 32 * 16
    assert rows["acc/kv16/len128"].details["acc_full_vocab"] == 1.0

    rows = {m.name: m for m in suite.run(RandomLogits(), TokenizerStub(), ctx())}
    chance = 1 / 64
    assert rows["acc"].details["chance"] == chance
    queries = 32 * (4 + 4 + 16 + 16)  # 1280: chance +- 3 standard errors is about +- 0.011
    assert abs(rows["acc"].value - chance) < 3 * (chance * (1 - chance) / queries) ** 0.5
    assert rows["acc/kv16/len128"].details["acc_full_vocab"] < 0.01


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="seq_len >= 4"):
        MqarSuite(kv_pairs="64", seq_lens="128")
    with pytest.raises(ValueError, match="integers"):
        MqarSuite(kv_pairs="four")
    with pytest.raises(ValueError, match="num_keys"):
        MqarSuite(kv_pairs="32", seq_lens="256", num_values=16)
    with pytest.raises(ValueError, match="limit"):
        MqarSuite(limit=0)


def _tiny(family: str):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    config = {"llama": lambda: LlamaConfig(**common), "qwen2": lambda: Qwen2Config(**common)}.get(
        family, lambda: tiny_config(family, vocab_size=VOCAB)
    )()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["deltanet", "gated_deltanet", "llama", "qwen2"])
def test_every_family_runs_through_its_logits(family):
    rows = {
        m.name: m for m in MqarSuite(kv_pairs="4,8", seq_lens="64", limit=8).run(_tiny(family), TokenizerStub(), ctx())
    }
    assert set(rows) == {"acc/kv4/len64", "acc/kv8/len64", "acc/kv4", "acc/kv8", "acc"}
    assert all(0.0 <= m.value <= 1.0 for m in rows.values())
    assert rows["acc"].value == pytest.approx((rows["acc/kv4/len64"].value + rows["acc/kv8/len64"].value) / 2)


def test_the_mqar_zoo_model_recalls_far_above_chance():
    from harness.loader import load_model
    from harness.zoo.mqar import NAME

    folder = zoo.WEIGHTS_DIR / NAME
    assert (folder / "config.json").is_file(), f"{folder} is missing: build it with harness.zoo.mqar.build_mqar()"
    loaded = load_model(str(folder), device="cpu")
    rows = {
        m.name: m for m in MqarSuite(kv_pairs="8", seq_lens="128", limit=16).run(loaded.model, loaded.tokenizer, ctx())
    }
    assert rows["acc"].details["chance"] == 1 / 64
    assert rows["acc"].value > 0.5
