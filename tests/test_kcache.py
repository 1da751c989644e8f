"""The pruned K cache: equal to its dense masked twin, identity at ratio 0, bytes that shrink."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.families.hf_softmax import SoftmaxAdapter, attention_modules
from harness.kcache import KeyChannelPlan, PrunedKCache, PrunedKLayer
from harness.kernels.pruned_attention import masked_attention, pruned_cache_attention
from harness.selection import ChannelSelection, LayerSelection


def tiny_softmax(kind: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=100,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(head_dim=16, **common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()  # q/k/v biases, head_dim 16


def mixed_selection(model, counts=(0, 8, 16, 4), sink=3, recent=5, value_sum=True, seed=1) -> ChannelSelection:
    """Per-head kept counts that differ within a layer, including 0 and all channels."""
    rng = torch.Generator().manual_seed(seed)
    layers = {}
    for i, (h, d, dv) in SoftmaxAdapter().geometry(model).items():
        kept = [
            tuple(sorted(torch.randperm(d, generator=rng)[: counts[(i * h + j) % len(counts)]].tolist()))
            for j in range(h)
        ]
        layers[i] = LayerSelection(d, dv, tuple(kept))
    family = model.config.model_type
    return ChannelSelection(
        family, layers, "test", 0.5, meta={"cache": {"sink": sink, "recent": recent, "value_sum": value_sum}}
    )


def padded_batch(n_tokens=20, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, n_tokens), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return ids.masked_fill(mask == 0, 0), mask


def generate(model, ids, mask, new=12, **kw):
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            **kw,
        )
    return out.sequences, torch.stack(out.scores, 1)


def cache_and_reference(model, selection):
    """Greedy decoding of the padded batch through the pruned cache and through the masked dense twin."""
    pruned, reference = copy.deepcopy(model), copy.deepcopy(model)
    SoftmaxAdapter().apply(pruned, selection)
    SoftmaxAdapter().zero(reference, selection)
    return generate(pruned, *padded_batch()), generate(reference, *padded_batch())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_ratio_zero_decodes_like_the_plain_model(kind):
    model = tiny_softmax(kind)
    realized = copy.deepcopy(model)
    adapter = SoftmaxAdapter()
    adapter.apply(realized, adapter.full_selection(realized))
    ids, mask = padded_batch()
    seq_plain, scores_plain = generate(model, ids, mask)
    seq, scores = generate(realized, ids, mask)
    assert torch.equal(seq, seq_plain)
    torch.testing.assert_close(scores, scores_plain, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("value_sum", [True, False])
def test_pruned_cache_equals_masked_dense_reference(kind, value_sum):
    model = tiny_softmax(kind)
    selection = mixed_selection(model, value_sum=value_sum)
    (seq, scores), (seq_ref, scores_ref) = cache_and_reference(model, selection)
    torch.testing.assert_close(scores, scores_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(seq, seq_ref)
    # and the masking is real: the realized model decodes differently from the plain one
    _, scores_plain = generate(model, *padded_batch())
    assert (scores - scores_plain).abs().max() > 1e-3


def test_generate_uses_a_pruned_cache_that_stores_only_kept_channels():
    model = tiny_softmax("llama")
    selection = mixed_selection(model)
    SoftmaxAdapter().apply(model, selection)
    cache = PrunedKCache([m.key_plan for m in attention_modules(model)])
    ids, mask = padded_batch(n_tokens=40)
    with torch.no_grad():
        model.generate(
            ids, attention_mask=mask, max_new_tokens=5, do_sample=False, past_key_values=cache, pad_token_id=0
        )
    for i, layer in enumerate(cache.layers):
        head, mid, win = layer.segment_lengths()
        assert (head, win) == (3 + 7, 5) and head + mid + win == 44  # sink + most padding; recent
        for group in layer.groups:
            kept = {len(selection.layers[i].kept[h]) for h in group.heads.tolist()}
            assert kept == {group.count}
            if group.count:
                assert group.mid_keys.shape == (3, len(group.heads), mid, group.count)
            else:  # no middle keys nor values: a running value sum
                assert group.mid_keys is None and group.mid_values is None
                assert group.value_sum.shape == (3, len(group.heads), 16)


def test_middle_grows_in_place_and_keeps_every_slot():
    """Decode steps append to the middle's store (a view per step, no copy of the whole middle);
    a full store regrows with spare room; the slots read back are the kept channels of every token."""
    from harness import kcache

    g = torch.Generator().manual_seed(0)
    kept = ((1, 5), (0, 2, 3, 7))
    plan = KeyChannelPlan(2, 8, 4, kept, sink=2, recent=3)
    layer = PrunedKLayer(plan)
    total = 2 + 20 + 3 + 30  # the middle grows from 20 to 50 slots: several regrowths
    k, v = torch.randn(2, 2, total, 8, generator=g), torch.randn(2, 2, total, 4, generator=g)
    layer.update(k[:, :, :25], v[:, :, :25])
    layer.start(torch.zeros(2, dtype=torch.long))
    layer.compact()
    group = layer.groups[0]  # 4 channels (groups by count, largest first)
    assert group.keys_store.shape[-2] == 20  # the prompt's middle: allocated exactly
    stores = {group.keys_store.data_ptr()}
    for t in range(25, total):
        layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        layer.compact()
        stores.add(group.keys_store.data_ptr())
    n_mid = total - 2 - 3
    assert layer.n_mid == n_mid and len(stores) >= 3  # regrew more than once
    assert group.keys_store.shape[-2] <= n_mid * (1 + kcache.GROWTH_FRACTION) + 1
    for grp in layer.groups:
        heads = grp.heads.tolist()
        expect = k[:, heads, 2 : 2 + n_mid][..., list(kept[heads[0]])]
        torch.testing.assert_close(grp.mid_keys, expect, rtol=0, atol=0)
        torch.testing.assert_close(grp.mid_values, v[:, heads, 2 : 2 + n_mid], rtol=0, atol=0)
        assert grp.mid_keys.data_ptr() == grp.keys_store.data_ptr()  # a view of the store
    bytes_ = layer.nbytes()
    stored = sum(grp.keys_store.numel() for grp in layer.groups) * 4
    assert bytes_["keys"] == stored + (layer.head_k.numel() + layer.win_k.numel()) * 4
    assert stored >= sum(grp.mid_keys.numel() for grp in layer.groups) * 4


def test_chunked_prefill_and_decode_match_reference_per_layer():
    """Layer level, any chunking: a 12-token prompt in chunks of 5, 4, 3, then one-token steps."""
    torch.manual_seed(0)
    b, hq, hkv, d, total = 2, 4, 2, 8, 20
    plan = KeyChannelPlan(hkv, d, d, ((1, 3, 5, 7), ()), sink=2, recent=3)
    q, k, v = torch.randn(b, hq, total, d), torch.randn(b, hkv, total, d), torch.randn(b, hkv, total, d)
    pads = torch.tensor([0, 3])
    layer = PrunedKLayer(plan)
    start = 0
    for length in (5, 4, 3) + (1,) * 8:
        end = start + length
        causal = torch.arange(end)[None, :] > torch.arange(start, end)[:, None]
        padded = torch.arange(end)[None, :] < pads[:, None]
        bias = torch.zeros(b, 1, length, end).masked_fill(causal[None, None] | padded[:, None, None], -1e30)
        layer.update(k[:, :, start:end], v[:, :, start:end])
        if layer.pads is None:
            layer.start(pads)
        out = pruned_cache_attention(q[:, :, start:end], layer, bias, scaling=0.3)
        ref = masked_attention(
            q[:, :, start:end],
            k[:, :, :end],
            v[:, :, :end],
            bias,
            key_scale=plan.key_scale(),
            sink=2,
            recent=3,
            scaling=0.3,
            pads=pads,
        )
        layer.compact()
        real = torch.arange(start, end)[None, :] >= pads[:, None]  # padded queries attend to nothing real
        torch.testing.assert_close(out[real], ref[real])
        start = end
    assert layer.segment_lengths() == (2 + 3, 20 - 5 - 3, 3)


def test_full_prefill_attends_the_prompt_with_all_channels():
    model = tiny_softmax("llama")
    selection = mixed_selection(model)
    selection.meta["cache"]["full_prefill"] = True
    (_, scores), (_, scores_ref) = cache_and_reference(model, selection)
    _, scores_plain = generate(model, *padded_batch())
    torch.testing.assert_close(scores, scores_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[:, 0], scores_plain[:, 0], atol=2e-5, rtol=1e-5)  # first token: the prompt only


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cache_bytes_fall_in_proportion_to_kept_channels(kind):
    model = tiny_softmax(kind)
    adapter = SoftmaxAdapter()
    d = 16

    def uniform(count):
        layers = {
            i: LayerSelection(d, d, tuple(tuple(range(count)) for _ in range(h)))
            for i, (h, _, _) in adapter.geometry(model).items()
        }
        return ChannelSelection(kind, layers, "test", 1 - count / d, meta={"cache": {"sink": 16, "recent": 64}})

    def metrics(count):
        return {m.name: m for m in adapter.bytes_metrics(model, uniform(count), context=4096)}

    dense, half, quarter = metrics(16), metrics(8), metrics(4)
    assert dense["kv_bytes"].value == dense["kv_bytes_dense"].value
    middle = 4096 - 16 - 64
    per_channel = 2 * 2 * middle * 4  # layers * kv heads * middle tokens * fp32 bytes, keys only
    assert dense["kv_bytes"].value - half["kv_bytes"].value == 8 * per_channel
    assert dense["kv_bytes"].value - quarter["kv_bytes"].value == 12 * per_channel
    assert half["k_reduction"].value == pytest.approx(0.5 * middle / 4096)
    assert quarter["v_reduction"].value == 0.0
