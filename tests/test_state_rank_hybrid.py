"""state-rank on transformers' hybrid models (Qwen3.5: Gated DeltaNet layers and softmax-attention
layers in one stack): both kinds of rows in one run, with model layer indices; the replayed
states against the ones transformers' own layers leave in their cache (prefill and a decode
step, grouped value heads); and a model whose linear layers were pruned by `HybridAdapter`."""

from __future__ import annotations

import math

import pytest
import torch

from harness.families.hf_linear import gdn_layers
from harness.families.hybrid import HybridAdapter
from harness.methods.random import RandomChannels
from harness.suite import SuiteContext
from harness.suites import rank_metrics as rm
from harness.suites.state_rank import StateRankSuite, record_delta_rule_calls, replay_states
from harness.zoo.train import fixed_threads

LINEAR, ATTENTION = [0, 1, 2], [3]
V_HEADS, KV_HEADS = 4, 2  # linear value heads (2 key heads, each serving 2), attention KV heads


@pytest.fixture(autouse=True)
def _one_thread():
    with fixed_threads(1):  # token loops over a tiny model: extra threads only add hand-off cost
        yield


def tiny_hybrid(seed: int = 0):
    """Three Gated DeltaNet layers (2 key heads of d_k 16, 4 value heads of d_v 8) and one
    attention layer (4 query heads, 2 KV heads of 16)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_5 import Qwen3_5TextConfig

    config = Qwen3_5TextConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=V_HEADS,
        linear_key_head_dim=16,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random init leaves tiny states: give them some scale
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def context(tmp_path):
    return SuiteContext("qwen3_5", "cpu", 3, tmp_path / "artifacts", lambda _d, _t: lambda n=1: None)


def cache_after(model, input_ids, cache=None):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config) if cache is None else cache
    with torch.no_grad():
        model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    return cache


def linear_states(cache) -> dict[int, torch.Tensor]:
    """Each Gated DeltaNet layer's recurrent state as transformers' cache holds it: [B, Hv, d_k, d_v]."""
    return {i: cache.layers[i].recurrent_states[0].clone() for i in LINEAR}


def close(actual, expected):
    # within 1e-4 of the state's own scale (and relatively)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-4, atol=1e-4 * expected.abs().max().item())


# --------------------------------------------------------------------------------------------


def test_replay_equals_the_state_transformers_leaves_in_its_cache():
    model = tiny_hybrid()
    layers = gdn_layers(model)
    assert [i for i, _ in layers] == LINEAR
    ids = torch.randint(3, 128, (2, 81), generator=torch.Generator().manual_seed(1))
    prompt, step = ids[:, :80], ids[:, 80:]
    with torch.no_grad():
        plain = model(input_ids=prompt, use_cache=False).logits
        with record_delta_rule_calls(layers) as calls:
            recorded = model(input_ids=prompt, use_cache=False).logits
    assert torch.equal(plain, recorded)  # the recorder calls through
    prefix, final = linear_states(cache_after(model, prompt[:, :30])), cache_after(model, prompt)
    full = linear_states(final)
    for i in LINEAR:
        assert [c.op for c in calls[i]] == ["torch_chunk_gated_delta_rule"]
        states = replay_states(calls[i][0], [30, 80])  # chained segments: after 30 and after 80 tokens
        assert states.shape == (2, 2, V_HEADS, 16, 8)  # a state per value head, d_k x d_v
        assert full[i].abs().max() > 1e-2  # not a trivially small state
        close(states[0], prefix[i])
        close(states[1], full[i])
    # a decode step: the one-token op, starting from the state the cache holds (updated in place)
    with torch.no_grad(), record_delta_rule_calls(layers) as calls:
        cache_after(model, step, final)
    after = linear_states(final)
    for i in LINEAR:
        assert [c.op for c in calls[i]] == ["torch_recurrent_gated_delta_rule"]
        close(calls[i][0].arguments["initial_state"], full[i])
        close(replay_states(calls[i][0], [1])[0], after[i])


def test_suite_reports_both_kinds_of_layer_with_model_indices(tmp_path, text_file, char_tokenizer):
    model = tiny_hybrid()
    suite = StateRankSuite(num_sequences=3, seq_len=40, every=16, batch_size=2, text_file=text_file)
    ctx = context(tmp_path)
    result = suite.run(model, char_tokenizer, ctx)
    rows = {r.name: r for r in result}
    assert len(rows) == len(result)
    heads = {r.name.split("/")[1] for r in result if "/" in r.name}
    for kind, layers, n in (
        ("u_final", LINEAR, V_HEADS),
        ("erank_final", LINEAR, V_HEADS),
        ("key_u", ATTENTION, KV_HEADS),
        ("key_erank", ATTENTION, KV_HEADS),
        ("key_energy_channels", ATTENTION, KV_HEADS),
    ):
        names = {r.name for r in result if r.name.startswith(kind + "/")}
        assert names == {f"{kind}/L{i}H{h}" for i in layers for h in range(n)}
        for name in names:
            layer = int(name.split("/L")[1].split("H")[0])
            assert rows[name].details["layer"] == layer and rows[name].details["scope"] == "head"
    assert heads == {f"L{i}H{h}" for i in LINEAR for h in range(V_HEADS)} | {f"L3H{h}" for h in range(KV_HEADS)}
    for r in result:
        if r.unit == "fraction":
            assert math.isfinite(r.value) and 0.0 <= r.value <= 1.0, r
        assert math.isfinite(r.value), r
    assert rows["u_final/L1H3"].details["capacity"] == 8 == min(16, 8)  # min(d_k, d_v) per value head
    assert (rows["u_final/L1H3"].details["d_k"], rows["u_final/L1H3"].details["d_v"]) == (16, 8)

    # both summaries, each listing its own plots and the model layers of its per_layer entries
    u_mean, key_mean = rows["u_final_mean"], rows["key_u_mean"]
    assert u_mean.details["layers"] == LINEAR and len(u_mean.details["per_layer"]) == 3
    assert key_mean.details["layers"] == ATTENTION and len(key_mean.details["per_layer"]) == 1
    assert u_mean.details["plots"] == ["state_utilization_vs_position.png", "state_rank_heatmap.png"]
    assert key_mean.details["plots"] == [
        "key_utilization_vs_position.png",
        "key_rank_heatmap.png",
        "key_energy_spectrum.png",
    ]
    for name in u_mean.details["plots"] + key_mean.details["plots"]:
        assert (ctx.artifacts / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in (
        "u_final_position_mean",
        "erank_final_mean",
        "sr_final_mean",
        "key_erank_mean",
        "key_sr_mean",
        "key_energy_channels_mean",
    ):
        assert rows[name].details["scope"] == "summary"

    # independent: the model's own cache, layer 3's keys (the cache's other layers are linear)
    ids = suite.sequences(char_tokenizer, ctx.seed)
    cache = cache_after(model, ids)
    states, keys = linear_states(cache), cache.layers[3].keys.double()  # keys: (3, 2, 40, 16)
    for h in range(KV_HEADS):
        expected = (rm.stable_rank(keys[:, h]) / 16).mean().item()
        assert rows[f"key_u/L3H{h}"].value == pytest.approx(expected, rel=1e-4)
    for i in LINEAR:
        u = rm.rank_utilization(states[i].double()).mean(0)  # over sequences
        for h in range(V_HEADS):
            assert rows[f"u_final/L{i}H{h}"].value == pytest.approx(u[h].item(), rel=1e-4)


def test_pruned_linear_layers_report_capacity_of_the_kept_channels(tmp_path, text_file, char_tokenizer):
    model = tiny_hybrid(seed=1)
    adapter = HybridAdapter.for_model(model)
    linear = adapter.part("linear")
    selection = RandomChannels(seed=0).select(linear.capture(model, [], frozenset()), 0.75, "gated_deltanet")
    adapter.apply(model, adapter.combine(model, selection, None))  # d_k 16 -> 4 in every linear layer
    assert model.config.linear_key_head_dim == 4
    suite = StateRankSuite(num_sequences=2, seq_len=32, every=16, batch_size=2, plots=False, text_file=text_file)
    ctx = context(tmp_path)
    rows = {r.name: r for r in suite.run(model, char_tokenizer, ctx)}
    states = linear_states(cache_after(model, suite.sequences(char_tokenizer, ctx.seed)))
    for i in LINEAR:
        assert states[i].shape[-2:] == (4, 8)
        u = rm.rank_utilization(states[i].double()).mean(0)
        for h in range(V_HEADS):
            row = rows[f"u_final/L{i}H{h}"]
            assert (row.details["d_k"], row.details["d_v"], row.details["capacity"]) == (4, 8, 4)  # min(d_k', d_v)
            assert row.value == pytest.approx(u[h].item(), rel=1e-4)
            assert 0.0 <= row.value <= 1.0
    assert rows["u_final_mean"].details["dims"] == [[4, 8]] * 3
    assert {r for r in rows if r.startswith("key_u/")} == {f"key_u/L3H{h}" for h in range(KV_HEADS)}
    assert rows["key_u/L3H0"].details["capacity"] == 16  # the attention layers stay dense
