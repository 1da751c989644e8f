"""The static decode loop (harness/graph_decode.py) against eager `generate`: same greedy tokens,
logits within tolerance, for tiny Llama and Qwen2 configs with GQA, left-padded batches whose
rows cross the sink and recent boundaries, heads keeping 0 channels, per-sequence channels
(ThinK), the full-channel prefill (LeanK's deployment) and plain models (the dense twin). On CPU
the loop runs eagerly through the kernels' torch twins; on CUDA (skipped without a GPU) its step
replays from a CUDA graph."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from harness import graph_decode
from harness.families.hf_softmax import SoftmaxAdapter
from test_kcache import generate, mixed_selection, padded_batch, tiny_softmax

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def realized(kind: str, *, value_sum=True, full_prefill=False, sink=3, recent=5, think=False):
    model = tiny_softmax(kind)
    counts = (8,) if think else (0, 8, 16, 4)
    selection = mixed_selection(model, counts=counts, sink=sink, recent=recent, value_sum=value_sum)
    selection.meta["cache"]["full_prefill"] = full_prefill
    if think:  # channels chosen per sequence at prefill: 8 of 16 per head
        selection.meta["prefill_chooser"] = {"method": "think", "params": {"window": 4}, "count": 8}
    SoftmaxAdapter().apply(model, selection)
    return model


def long_batch(n_tokens=120, seed=1):
    """Three left-padded rows of 120, 96 and 33 tokens: past the plain model's sink 16 + recent 64."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (3, n_tokens), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :24] = 0
    mask[2, :87] = 0
    return ids.masked_fill(mask == 0, 0), mask


def both(model, ids, mask, device="cpu", new=12, **kw):
    """(sequences, scores) of eager generate and of the static loop."""
    ids, mask = ids.to(device), mask.to(device)
    seq, scores = generate(model, ids, mask, new=new, **kw)
    out = graph_decode.generate(model, ids, mask, max_new_tokens=new, pad_token_id=0, return_logits=True, **kw)
    return (seq, scores), (out.sequences, out.logits)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "options", [dict(), dict(value_sum=False), dict(full_prefill=True), dict(think=True), dict(sink=0, recent=2)]
)
def test_pruned_model_decodes_like_generate(kind, options):
    model = realized(kind, **options)
    (seq, scores), (seq2, scores2) = both(model, *padded_batch())
    assert torch.equal(seq2, seq)
    torch.testing.assert_close(scores2, scores, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_plain_model_decodes_like_generate_through_its_dense_twin(kind):
    model = tiny_softmax(kind)
    (seq, scores), (seq2, scores2) = both(model, *long_batch(), new=40)
    assert torch.equal(seq2, seq)
    torch.testing.assert_close(scores2, scores, atol=2e-5, rtol=1e-5)
    cache = model._harness_decoder.state.cache
    assert all(layer.dense and layer.capacity > 0 for layer in cache.layers.values())


def linear(family: str, pruned: bool):
    """A tiny fla model, dense or with half of each head's key channels sliced away."""
    from conftest import tiny_model
    from harness.families import adapter_for
    from harness.selection import ChannelSelection, LayerSelection

    model = tiny_model(family)
    if pruned:
        adapter = adapter_for(model)
        layers = {
            i: LayerSelection(d, dv, tuple(tuple(range(1, d, 2)) for _ in range(h)))
            for i, (h, d, dv) in adapter.geometry(model).items()
        }
        adapter.apply(model, ChannelSelection(adapter.family, layers, "odd", 0.5))
    return model


@pytest.mark.parametrize("family", ["deltanet", "gated_deltanet"])
@pytest.mark.parametrize("pruned", [False, True])
def test_linear_model_decodes_like_generate(family, pruned):
    """Rows prefilled on their own (no padding: linear attention has no positions), their states
    copied into the batch's, then decoded together with no mask."""
    model = linear(family, pruned)
    ids, mask = padded_batch(vocab=128)
    (seq, scores), (seq2, scores2) = both(model, ids, mask)
    assert torch.equal(seq2, seq)
    torch.testing.assert_close(scores2, scores, atol=2e-5, rtol=1e-5)
    recurrent = model._harness_decoder.state.cache.layers[0].state["recurrent_state"]
    assert recurrent.shape[0] == 3 and (16 if pruned else 32) in recurrent.shape[-2:]  # d_k 32, or 16 sliced


def hybrid(compressed: bool, model_type: str = "qwen3_5_text"):
    """A tiny hybrid (3 Gated DeltaNet layers, 1 attention layer), plain or with half of its linear
    key channels sliced away and a K-cache selection on its attention layer."""
    from harness.families import adapter_for
    from harness.methods.random import RandomChannels
    from test_hybrid import linear_selection, tiny_hybrid

    model = tiny_hybrid(model_type)
    if compressed:
        adapter = adapter_for(model)
        softmax = RandomChannels().select(adapter.part("softmax").capture(model, [], frozenset()), 0.75, "attention")
        softmax = dataclasses.replace(softmax, meta={**softmax.meta, "cache": {"sink": 3, "recent": 5}})
        adapter.apply(model, adapter.combine(model, linear_selection(model, 0.5, RandomChannels()), softmax))
    return model


HYBRIDS = [
    ("qwen3_5_text", False),
    ("qwen3_5_text", True),
    ("qwen3_5_moe_text", True),
    ("qwen3_next", True),
    ("olmo_hybrid", False),
    ("olmo_hybrid", True),
]


@pytest.mark.parametrize("model_type, compressed", HYBRIDS)
def test_hybrid_model_decodes_like_generate(model_type, compressed):
    """Attention layers through the static pruned K cache, linear layers through their states
    allocated once for the batch; left-padded rows of 20, 16 and 13 tokens past sink 3 + recent 5."""
    model = hybrid(compressed, model_type)
    ids, mask = padded_batch(vocab=128)
    (seq, scores), (seq2, scores2) = both(model, ids, mask)
    assert torch.equal(seq2, seq)
    torch.testing.assert_close(scores2, scores, atol=2e-5, rtol=1e-5)
    cache = model._harness_decoder.state.cache
    assert sorted(cache.layers) == [3] and sorted(cache.linear) == [0, 1, 2]
    assert cache.linear[0].recurrent_states[0].shape[0] == 3  # one state per row, allocated once


def test_moe_hybrid_steps_through_graph_safe_experts():
    """Qwen3-Next's experts route on the host by default (which experts were hit); a decode step
    switches them to the fixed-shape `batched_mm` experts, and back for everything else."""
    from harness.decode_state import GRAPH_SAFE_EXPERTS

    model = hybrid(False, "qwen3_next")
    seen = []
    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    assert experts
    for m in experts:
        m.register_forward_pre_hook(
            lambda module, args: seen.append((args[0].shape[0], module.config._experts_implementation))
        )
    ids, mask = padded_batch(vocab=128)
    graph_decode.generate(model, ids, mask, max_new_tokens=4, pad_token_id=0)
    seen.clear()  # the decoder is kept: the next call is a prefill and its steps only (no sizing forward)
    graph_decode.generate(model, ids, mask, max_new_tokens=4, pad_token_id=0)
    steps = [impl for tokens, impl in seen if tokens == 3]  # one token for each of the 3 rows: a decode step
    prefills = [impl for tokens, impl in seen if tokens > 3]
    assert steps and set(steps) == {GRAPH_SAFE_EXPERTS}
    assert prefills and GRAPH_SAFE_EXPERTS not in prefills
    assert model.config._experts_implementation != GRAPH_SAFE_EXPERTS


def test_end_of_sequence_pads_finished_rows_and_stops_where_generate_stops():
    model = realized("llama")
    ids, mask = padded_batch()
    seq, _ = generate(model, ids, mask)
    eos = int(seq[1, ids.shape[1] + 3])  # a token row 1 emits at its 4th step: rows end at different steps
    (want, _), (got, _) = both(model, ids, mask, eos_token_id=eos)
    assert torch.equal(got, want)
    out = graph_decode.generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0, check_every=1)
    assert torch.equal(out.sequences, want)


def test_min_new_tokens_holds_back_the_end_of_sequence():
    model = realized("qwen2")
    ids, mask = padded_batch()
    seq, _ = generate(model, ids, mask)
    eos = int(seq[0, ids.shape[1]])  # row 0's first new token
    (want, _), (got, _) = both(model, ids, mask, eos_token_id=eos, min_new_tokens=3)
    assert torch.equal(got, want)


def test_prefill_in_small_chunks_equals_one_forward():
    model = realized("llama")
    ids, mask = long_batch()
    one = graph_decode.generate(model, ids, mask, max_new_tokens=6, return_logits=True)
    graph_decode.release(model)
    dec = graph_decode.Decoder(model, 3, 192, max_new_tokens=6, record_logits=True, prefill_tokens=1)
    first = dec.prefill(ids, mask)
    n, _ = dec.decode(first, 6)
    torch.testing.assert_close(dec.result(ids, n).logits, one.logits, atol=1e-5, rtol=1e-5)


def test_sampling_draws_from_the_softmax():
    model = tiny_softmax("llama")
    dec = graph_decode.Decoder(model, 1, 64, max_new_tokens=2, sampling=graph_decode.Sampling(True, temperature=2.0))
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, -1)
    counts = torch.bincount(dec._choose(logits), minlength=4).float() / 20000
    torch.testing.assert_close(counts, (logits[0] / 2).softmax(-1), atol=0.015, rtol=0)
    top = graph_decode.Decoder(model, 1, 64, max_new_tokens=2, sampling=graph_decode.Sampling(True, top_k=2, top_p=0.5))
    assert set(top._choose(logits).tolist()) == {0}  # top_p 0.5 keeps the first of the top 2 (mass 0.73)


def test_greedy_sampling_limits_give_the_greedy_tokens():
    model = realized("llama")
    ids, mask = padded_batch()
    greedy = graph_decode.generate(model, ids, mask, max_new_tokens=8).sequences
    top1 = graph_decode.generate(model, ids, mask, max_new_tokens=8, do_sample=True, top_k=1).sequences
    assert torch.equal(top1, greedy)


def test_the_decoder_is_reused_for_the_same_shapes_and_replaced_for_others():
    model = realized("llama")
    ids, mask = padded_batch()
    graph_decode.generate(model, ids, mask, max_new_tokens=5)
    first = model._harness_decoder
    graph_decode.generate(model, ids, mask, max_new_tokens=5)
    assert model._harness_decoder is first
    graph_decode.generate(model, ids[:2], mask[:2], max_new_tokens=5)
    assert model._harness_decoder is not first and model._harness_decoder.batch == 2
    graph_decode.release(model)
    assert "_harness_decoder" not in model.__dict__


def test_what_the_loop_does_not_take(tmp_path):
    unknown = types.SimpleNamespace(config=types.SimpleNamespace(model_type="mamba2"))
    assert "model type 'mamba2'" in graph_decode.reason(unknown)
    with pytest.raises(ValueError, match="left-padded"):
        graph_decode.rows_of(torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    model = realized("llama")
    ids, mask = padded_batch()
    dec = graph_decode.Decoder(model, 3, 24, max_new_tokens=8)
    with pytest.raises(ValueError, match="exceed"):
        dec.prefill(ids, mask)
    # on CPU the suites' entry point is the model's own generate
    seq, _ = generate(model, ids, mask)
    out = graph_decode.generate_or_fallback(model, ids, mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(out, seq) and "_harness_decoder" not in model.__dict__


# --- on a GPU: the captured graph ------------------------------------------------------------------


def assert_greedy_agrees(reference, ours, width: int, tol: float, tie: float = 0.1) -> None:
    """Equal greedy tokens and logits within `tol`, except that in 16-bit arithmetic the two paths
    may part at a near-tie: where the tokens first differ, the reference must rate both tokens
    within `tie` of each other (and every step before must agree within `tol`)."""
    (seq, scores), (seq2, scores2) = reference, ours
    differ = (seq[:, width:] != seq2[:, width:]).any(0).nonzero()
    upto = int(differ[0]) if len(differ) else scores.shape[1]
    torch.testing.assert_close(scores2[:, :upto].float(), scores[:, :upto].float(), atol=tol, rtol=tol)
    if upto < scores.shape[1]:
        rows = (seq[:, width + upto] != seq2[:, width + upto]).nonzero().flatten()
        for row in rows.tolist():
            ref = scores[row, upto].float()
            gap = (ref[seq[row, width + upto]] - ref[seq2[row, width + upto]]).abs()
            assert gap <= tie, f"row {row} parts from generate at step {upto} where the logits differ by {gap:.3f}"


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("options", [dict(), dict(full_prefill=True), dict(think=True)])
def test_graph_replays_decode_like_generate_on_cuda(kind, dtype, tol, options):
    model = realized(kind, **options).to("cuda", dtype)
    ids, mask = padded_batch()
    reference, ours = both(model, ids, mask, device="cuda")
    assert model._harness_decoder.graph is not None
    assert model._harness_decoder.projections.groups  # its step ran q/k/v and gate/up as one GEMM each
    if dtype == torch.float32:
        assert torch.equal(ours[0], reference[0])
    assert_greedy_agrees(reference, ours, ids.shape[1], tol)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_plain_model_graph_decodes_like_generate_on_cuda(kind):
    model = tiny_softmax(kind).to("cuda", torch.bfloat16)
    ids, mask = long_batch()
    assert_greedy_agrees(*both(model, ids, mask, device="cuda", new=40), ids.shape[1], 5e-2)
    model = tiny_softmax(kind).to("cuda")  # fp32: no ties to part at
    (seq, scores), (seq2, scores2) = both(model, ids, mask, device="cuda", new=40)
    assert torch.equal(seq2, seq)
    torch.testing.assert_close(scores2, scores, atol=1e-4, rtol=1e-4)


STATE_MODELS = {  # models whose decode state is not (only) a K cache
    "deltanet": lambda: linear("deltanet", False),
    "deltanet-sliced": lambda: linear("deltanet", True),
    "gated_deltanet": lambda: linear("gated_deltanet", False),
    "gated_deltanet-sliced": lambda: linear("gated_deltanet", True),
    "hybrid": lambda: hybrid(False),
    "hybrid-compressed": lambda: hybrid(True),
    "qwen3_next-compressed": lambda: hybrid(True, "qwen3_next"),
    "olmo_hybrid-compressed": lambda: hybrid(True, "olmo_hybrid"),
}


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("name", list(STATE_MODELS))
def test_recurrent_state_graph_replays_decode_like_generate_on_cuda(name):
    """The padded batch through the loop against each row generated alone: a recurrent row needs
    no padding, and on CUDA transformers' own batched path is not padding-free. On an H100 the
    OLMo-hybrid rows of the padded batch `generate` differed from the same rows generated alone
    by up to 5.5e-4 in the logits (parting at a near-tie), the loop from the rows alone by 6e-7."""
    model = STATE_MODELS[name]().cuda()
    ids, mask = padded_batch(vocab=128)
    new = 12
    out = graph_decode.generate(model, ids.cuda(), mask.cuda(), max_new_tokens=new, pad_token_id=0, return_logits=True)
    assert model._harness_decoder.graph is not None
    assert model._harness_decoder.projections.groups  # its step ran sibling projections as one GEMM each
    assert_rows_decode_alike(
        out, ids, mask, lambda alone: generate(model, alone.cuda(), torch.ones_like(alone).cuda(), new=new)
    )


@pytest.mark.parametrize("name", ["gated_deltanet", "hybrid-compressed"])
def test_recurrent_state_loop_decodes_each_row_as_alone(name, monkeypatch):
    """The GPU test's comparison on CPU, through the kernels' torch twins (`KERNEL_DEVICES` widened):
    a row of the tiny Gated DeltaNet ends its own generation early (at its end of sequence), so
    the loop's row is compared up to there and must be padding after."""
    from harness.kernels import fla_decode

    monkeypatch.setattr(fla_decode, "KERNEL_DEVICES", ("cpu",))
    model = STATE_MODELS[name]()
    ids, mask = padded_batch(vocab=128)
    out = graph_decode.generate(model, ids, mask, max_new_tokens=12, pad_token_id=0, return_logits=True)
    assert_rows_decode_alike(out, ids, mask, lambda alone: generate(model, alone, torch.ones_like(alone), new=12))


def assert_rows_decode_alike(out, ids, mask, alone) -> None:
    """Each row of the loop's batch decodes what `alone(row's prompt)` generates: its tokens up to
    the row's end of sequence, padding after it, and its logits up to there."""
    width = ids.shape[1]
    for row in range(ids.shape[0]):
        seq, scores = alone(ids[row, mask[row].bool()][None])
        n = scores.shape[1]  # the row's own generation stops at its end of sequence
        assert torch.equal(out.sequences[row, width : width + n].cpu(), seq[0, -n:].cpu()), f"row {row}"
        assert not out.sequences[row, width + n :].any(), f"row {row}: padding after its end of sequence"
        torch.testing.assert_close(out.logits[row, :n], scores[0].to(out.logits.device), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@CUDA
def test_fla_decode_step_is_refused_by_the_loop(monkeypatch):
    from harness.kernels import fla_decode

    monkeypatch.setenv(fla_decode.ENV, "fla")
    assert "new state tensor" in graph_decode.reason(linear("deltanet", False).cuda())


@pytest.mark.gpu
@CUDA
def test_graph_steps_do_not_synchronize_the_host():
    model = realized("llama").to("cuda", torch.bfloat16)
    ids, mask = (t.cuda() for t in padded_batch())
    dec = graph_decode.Decoder(model, 3, 64, max_new_tokens=30)
    first = dec.prefill(ids, mask)
    torch.cuda.set_sync_debug_mode("error")
    try:
        n, _ = dec.decode(first, 30)  # no end of sequence: the host never reads the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert n == 30
