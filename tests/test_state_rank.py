"""state-rank: the rank metrics on planted spectra, the replayed delta rule against the state fla's
own layers leave in their cache, and the suite's rows against those states (linear, pruned linear,
and a compressed softmax model)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from conftest import tiny_model

from harness.families.fla_linear import DeltaNetAdapter, GatedDeltaNetAdapter
from harness.families.hf_softmax import SoftmaxAdapter
from harness.selection import ChannelSelection, LayerSelection
from harness.suite import SuiteContext
from harness.suites import rank_metrics as rm
from harness.suites.state_rank import REPLAY, StateRankSuite, positions_for, record_delta_rule_calls, replay_states
from harness.zoo.train import fixed_threads


@pytest.fixture(autouse=True)
def _one_thread():
    # these tests run thousands of tiny ops (token loops over tiny models): on a small shared
    # machine, extra torch threads only add hand-off cost
    with fixed_threads(1):
        yield


def planted(d: int, d2: int, singular: list[float], seed: int = 0) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal U (d x r) and V (d2 x r): singular values exactly s."""
    g = torch.Generator().manual_seed(seed)
    r = len(singular)
    u = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(d2, r, generator=g, dtype=torch.float64)).Q
    return u @ torch.diag(torch.tensor(singular, dtype=torch.float64)) @ v.T


# --------------------------------------------------------------------------------------------
# metrics


def test_planted_rank_r_state_gives_the_formulas():
    # s = (3, 2, 1) in an 8 x 6 state: sr = (9+4+1)/9, u = sr/6, p = (1/2, 1/3, 1/6)
    state = planted(8, 6, [3.0, 2.0, 1.0])
    entropy = -(0.5 * math.log(0.5) + math.log(1 / 3) / 3 + math.log(1 / 6) / 6)
    assert rm.stable_rank(state).item() == pytest.approx(14 / 9, rel=1e-12)
    assert rm.rank_utilization(state).item() == pytest.approx(14 / 54, rel=1e-12)
    assert rm.effective_rank(state).item() == pytest.approx(math.exp(entropy), rel=1e-12)


@pytest.mark.parametrize("d, d2, r", [(32, 32, 4), (16, 32, 16), (32, 16, 7)])
def test_flat_rank_r_spectrum_uses_r_over_min_dim(d, d2, r):
    state = planted(d, d2, [2.5] * r, seed=r)
    assert rm.stable_rank(state).item() == pytest.approx(r, rel=1e-10)
    assert rm.effective_rank(state).item() == pytest.approx(r, rel=1e-10)
    assert rm.rank_utilization(state).item() == pytest.approx(r / min(d, d2), rel=1e-10)


def test_singular_values_from_the_gram_matrix():
    tall = planted(200, 16, [9.0, 3.0, 1.0, 1e-3])  # rank 4 of 16: 12 exact zeros
    s = rm.singular_values_from_gram(tall.T @ tall)
    assert s[:4].tolist() == pytest.approx([9.0, 3.0, 1.0, 1e-3], rel=1e-6)
    assert s[4:].tolist() == [0.0] * 12


def test_metrics_are_batched_and_zero_for_an_empty_state():
    states = torch.stack([planted(6, 4, [1.0, 1.0]), torch.zeros(6, 4), planted(6, 4, [4.0, 2.0, 2.0, 0.5])])
    assert rm.stable_rank(states).tolist() == pytest.approx([2.0, 0.0, (16 + 4 + 4 + 0.25) / 16])
    assert rm.rank_utilization(states).tolist() == pytest.approx([0.5, 0.0, 24.25 / 64])
    p = torch.tensor([4.0, 2.0, 2.0, 0.5]) / 8.5
    assert rm.effective_rank(states).tolist() == pytest.approx([2.0, 0.0, math.exp(-(p * p.log()).sum().item())])


def test_channel_energy_spectrum_and_energy_count():
    keys = torch.zeros(2, 4, 5)  # (heads, tokens, channels); head 1 has no energy at all
    keys[0, :, 3] = 2.0  # mean k^2 = 4
    keys[0, :, 1] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # 1
    spectrum = rm.channel_energy_spectrum(keys)
    assert spectrum.tolist() == [[0.8, 0.2, 0.0, 0.0, 0.0], [0.0] * 5]
    assert rm.channels_for_energy(spectrum, 0.8).tolist() == [1, 0]
    assert rm.channels_for_energy(spectrum, 0.9).tolist() == [2, 0]
    with pytest.raises(ValueError):
        rm.channels_for_energy(spectrum, 0.0)


def test_positions_include_the_last_token():
    assert positions_for(64, 16) == [16, 32, 48, 64]
    assert positions_for(50, 16) == [16, 32, 48, 50]
    assert positions_for(5, 5) == [5]


# --------------------------------------------------------------------------------------------
# replay against fla's own layers


def cache_states(model, input_ids) -> list[torch.Tensor]:
    """Each layer's recurrent state from the model's own cache, as [B, heads, d_k, d_v]."""
    with torch.no_grad():
        cache = model(input_ids=input_ids, use_cache=True).past_key_values
    states = [cache[i]["recurrent_state"] for i in range(len(model.model.layers))]
    v_first = GatedDeltaNetAdapter.matches(model)  # Gated DeltaNet's cache holds [V, K]
    return [s.transpose(-1, -2) if v_first else s for s in states]


@pytest.mark.parametrize(
    "family, over", [("deltanet", {}), ("gated_deltanet", {}), ("gated_deltanet", {"num_v_heads": 4})]
)  # grouped value heads
def test_replayed_states_equal_the_layers_cache(family, over):
    model = tiny_model(family, **over)
    adapter = DeltaNetAdapter() if family == "deltanet" else GatedDeltaNetAdapter()
    layers = adapter.layers(model)
    ids = torch.randint(3, 128, (2, 80), generator=torch.Generator().manual_seed(1))  # > 64 tokens: chunk mode
    module = sys.modules[type(layers[0][1]).__module__]
    ops_before = {op: vars(module).get(op) for op in REPLAY}
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with record_delta_rule_calls(layers) as calls:
            recorded = model(input_ids=ids).logits
    assert torch.equal(plain, recorded)  # the recorder calls through
    assert {op: vars(module).get(op) for op in REPLAY} == ops_before  # and puts fla's names back
    final, prefix = cache_states(model, ids), cache_states(model, ids[:, :30])  # 30 tokens: recurrent mode
    for (index, _), made in zip(layers, (calls[i] for i, _ in layers)):
        assert len(made) == 1
        states = replay_states(made[0], [30, 80])  # chained segments: the state after 30 and 80 tokens
        assert states.shape[-2:] == final[index].shape[-2:]
        torch.testing.assert_close(states[0], prefix[index].float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(states[1], final[index].float(), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# the suite


def context(family, tmp_path, seed=3):
    return SuiteContext(family, "cpu", seed, tmp_path / "artifacts", lambda _d, _t: lambda n=1: None)


def halve(adapter, model, seed=0) -> ChannelSelection:
    """A selection keeping a random half of every head's key channels."""
    g = torch.Generator().manual_seed(seed)
    layers = {
        i: LayerSelection(
            d, dv, tuple(tuple(sorted(torch.randperm(d, generator=g)[: d // 2].tolist())) for _ in range(h))
        )
        for i, (h, d, dv) in adapter.geometry(model).items()
    }
    return ChannelSelection(adapter.family, layers, "test", 0.5)


def by_name(rows):
    return {r.name: r for r in rows}


def check_png(folder, names):
    for name in names:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("family", ["deltanet", "gated_deltanet"])
def test_suite_rows_are_the_rank_of_the_pruned_models_own_states(family, tmp_path, text_file, char_tokenizer):
    model = tiny_model(family)
    adapter = DeltaNetAdapter() if family == "deltanet" else GatedDeltaNetAdapter()
    adapter.apply(model, halve(adapter, model))  # real surgery: head_k_dim 32 -> 16
    suite = StateRankSuite(num_sequences=3, seq_len=40, every=16, batch_size=2, text_file=text_file)
    ctx = context(family, tmp_path)
    rows = by_name(suite.run(model, char_tokenizer, ctx))
    states = cache_states(model, suite.sequences(char_tokenizer, ctx.seed))  # independent: fla's cache
    heads = states[0].shape[1]
    for layer, state in enumerate(states):
        u, er = rm.rank_utilization(state).mean(0), rm.effective_rank(state).mean(0)  # over sequences
        for head in range(heads):
            row = rows[f"u_final/L{layer}H{head}"]
            assert row.value == pytest.approx(u[head].item(), rel=1e-4)
            assert (row.details["layer"], row.details["head"], row.details["d_k"]) == (layer, head, 16)
            assert rows[f"erank_final/L{layer}H{head}"].value == pytest.approx(er[head].item(), rel=1e-4)
    all_u = torch.stack([rm.rank_utilization(s).mean(0) for s in states])
    summary = rows["u_final_mean"]
    assert summary.value == pytest.approx(all_u.mean().item(), rel=1e-4)
    assert summary.details["positions"] == [16, 32, 40]
    check_png(ctx.artifacts, summary.details["plots"])
    assert len(summary.details["plots"]) == 2


def test_softmax_suite_reads_masked_post_rope_keys(tmp_path, text_file, char_tokenizer):
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            vocab_size=100,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).eval()
    adapter = SoftmaxAdapter()
    selection = halve(adapter, model, seed=2)
    adapter.apply(model, selection)  # a compressed model: key_channel_mask on every attention module
    suite = StateRankSuite(num_sequences=3, seq_len=40, every=16, batch_size=3, text_file=text_file)
    ctx = context("llama", tmp_path)
    rows = by_name(suite.run(model, char_tokenizer, ctx))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=suite.sequences(char_tokenizer, ctx.seed), past_key_values=cache, use_cache=True)
    for layer, sel in selection.layers.items():
        mask = torch.zeros(2, 16, dtype=torch.float64)
        for head, kept in enumerate(sel.kept):
            mask[head, list(kept)] = 1
        keys = cache.layers[layer].keys.double() * mask[None, :, None, :]  # (B, heads, 40, 16)
        spectrum = rm.normalized_spectrum(keys.pow(2).sum((0, 2)))
        for head in range(2):
            where = f"L{layer}H{head}"
            assert rows[f"kept_channels/{where}"].value == 8
            # utilization relative to the 8 kept channels: the masked key matrix is 40 x 8 in effect
            u, er = (rm.stable_rank(keys[:, head]) / 8).mean(), rm.effective_rank(keys[:, head]).mean()
            assert rows[f"key_u/{where}"].value == pytest.approx(u.item(), rel=1e-4)
            assert rows[f"key_erank/{where}"].value == pytest.approx(er.item(), rel=1e-4)
            assert rows[f"key_energy_channels/{where}"].value == rm.channels_for_energy(spectrum[head], 0.9).item() <= 8
            assert rows[f"key_energy_channels/{where}"].details["spectrum"][8:] == [0.0] * 8  # dropped channels
    assert rows["kept_channels_mean"].value == 8
    assert rows["key_u/L0H0"].details["capacity"] == 8
    check_png(ctx.artifacts, rows["key_u_mean"].details["plots"])
    assert len(rows["key_u_mean"].details["plots"]) == 3


def test_summary_only_and_no_plots(tmp_path, text_file, char_tokenizer):
    suite = StateRankSuite(num_sequences=2, seq_len=20, every=20, per_head=False, plots=False, text_file=text_file)
    ctx = context("deltanet", tmp_path)
    rows = suite.run(tiny_model("deltanet"), char_tokenizer, ctx)
    assert all(r.details["scope"] == "summary" for r in rows)
    assert rows[0].details["plots"] == [] and not ctx.artifacts.exists()


@pytest.mark.parametrize(
    "bad",
    [
        dict(num_sequences=0),
        dict(seq_len=1),
        dict(every=0),
        dict(every=300),
        dict(batch_size=0),
        dict(energy_fraction=0.0),
        dict(replay_threads=-1),
    ],
)
def test_bad_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        StateRankSuite(**bad)
