"""Softmax-family methods on known answers: planted dead key channels in the zoo's llama-tiny,
the published LeanK masks, and LeanK against its baselines on held-out sequences."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from harness.compress import plan
from harness.errors import HarnessError
from harness.families.hf_softmax import SoftmaxAdapter
from harness.methods.leank import LeanK
from harness.methods.leank_training import binarize, heldout_distillation_loss
from harness.methods.think import ThinK
from harness.progress import bars

MASKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "leank-masks"
D = 32
# RoPE rotates channel c with c + d/2, so a channel is dead after RoPE only with its partner
DEAD = sorted({c for base in (1, 4, 6, 9, 11, 13, 14, 15) for c in (base, base + D // 2)})  # 16 of 32


def planted_plan(method: str, **params):
    """llama-tiny with the q_proj and k_proj rows of channels DEAD zeroed in every head: those
    post-RoPE query and key channels are exactly 0 (they never contribute to a score), so every
    data-aware method must drop them first at ratio 0.5."""
    p = plan("llama-tiny", method, [0.5], method_params=params)
    with torch.no_grad():
        for layer in p.loaded.model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):  # (heads * D, hidden)
                proj.weight.view(-1, D, proj.weight.shape[1])[:, DEAD] = 0
    return p


def select(p, ratio=0.5):
    with bars(False) as bar:
        return p.select(p.capture(bar), ratio, bar)


LIVE = tuple(c for c in range(D) if c not in DEAD)


@pytest.mark.parametrize("method", ["magnitude", "drrqr", "qrcp"])
def test_static_selectors_keep_exactly_the_live_channels(method):
    selection = select(planted_plan(method))
    for sel in selection.layers.values():
        assert all(kept == LIVE for kept in sel.kept)


def test_random_does_not_find_the_live_channels():
    selection = select(planted_plan("random"))
    assert not all(kept == LIVE for sel in selection.layers.values() for kept in sel.kept)


def test_leank_training_drops_the_dead_channels():
    """Dead channels get no distillation gradient, so the L1 term drives their scale to 0 while
    the live ones that matter stay up: at a budget of 8 channels per head, none is dead. (With
    align=1: an aligned count may force a head to round up into its zero-scale channels.)"""
    p = planted_plan("leank", steps=80, steps2=10, seq_len=128, pool=2, batch=2, align=1)
    selection = select(p, 0.75)
    assert selection.kept_ratio == 0.25
    assert float(p.selector._trained["alpha"][:, :, DEAD].max()) == 0.0
    for sel in selection.layers.values():
        assert all(set(kept) <= set(LIVE) for kept in sel.kept)


def test_think_scores_dead_channels_zero_per_sequence():
    think = ThinK(window=4)
    torch.manual_seed(0)
    query, keys = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 10, 8)
    keys[0, :, :, [0, 5]] = 0  # row 0: channels 0 and 5 dead; row 1: channel 3 dead in padded slots only
    keys[1, :, 3:, 3] = 0
    kept = think.choose_at_prefill(query, keys, torch.tensor([0, 3]), count=6)
    assert kept.shape == (2, 2, 6)
    assert not set(kept[0].flatten().tolist()) & {0, 5}
    assert 3 not in kept[1].flatten().tolist()  # padded slots do not count


def test_think_realized_through_generate_stores_fewer_channels():
    p = plan("llama-tiny", "think", [0.75])
    model, tok = p.loaded.model, p.loaded.tokenizer
    selection = select(p, 0.75)
    pruned, reference = copy.deepcopy(model), copy.deepcopy(model)
    SoftmaxAdapter().apply(pruned, selection)
    SoftmaxAdapter().zero(reference, selection)
    tok.padding_side = "left"
    batch = tok(
        ["Return the number of items in a container. " * 12, "Open the file and return a stream. " * 9],
        return_tensors="pt",
        padding=True,
    )
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = pruned.generate(**batch, **kwargs)
        ref = reference.generate(**batch, **kwargs)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-4, rtol=1e-4)
    metrics = {m.name: m.value for m in SoftmaxAdapter().bytes_metrics(model, selection, context=1024)}
    assert metrics["k_reduction"] == pytest.approx(0.75 * (1024 - 16 - 64) / 1024)


def test_binarize_keeps_the_budget_and_the_alignment():
    alpha = torch.rand(3, 4, 32, generator=torch.Generator().manual_seed(0))
    mask = binarize(alpha, 0.75, 8)
    assert mask.sum() == 0.25 * alpha.numel()
    assert set((mask.sum(-1) % 8).flatten().tolist()) == {0}
    top = mask.sum(-1).long()
    for layer in range(3):  # each head keeps its highest-alpha channels
        for head in range(4):
            kept = alpha[layer, head][mask[layer, head] == 1]
            dropped = alpha[layer, head][mask[layer, head] == 0]
            if top[layer, head] and len(dropped):
                assert kept.min() >= dropped.max()


def test_leank_beats_random_and_magnitude_on_heldout_distillation_loss():
    """The issue's acceptance: same kept ratio (0.25), held-out pass-key sequences, llama-tiny."""
    losses = {}
    for method in ("leank", "magnitude", "random"):
        p = plan("llama-tiny", method, [0.75])
        selection = select(p, 0.75)
        assert selection.kept_ratio == 0.25
        losses[method] = heldout_distillation_loss(p.loaded.model, p.loaded.tokenizer, selection)
    assert losses["leank"] < losses["magnitude"] < losses["random"], losses


# --- published masks -------------------------------------------------------------------------
needs_masks = pytest.mark.skipif(not MASKS.is_dir(), reason=f"published LeanK masks not found at {MASKS}")


@needs_masks
def test_published_llama_mask_on_the_real_llama_31_8b_geometry():
    """Random weights (on the meta device: no memory) with Llama-3.1-8B's layers, KV heads and head_dim."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=128256,
        torch_dtype="bfloat16",
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    adapter = SoftmaxAdapter()
    method = LeanK(mask=str(MASKS / "llama3.1-8b-instruct.pth"))
    assert method.implied_ratio() == pytest.approx(1 - 0.3125)
    selection = method.select(adapter.capture(model, [], method.needs), 0.6875, "llama")
    assert selection.kept_ratio == pytest.approx(0.3125)
    zero_heads = sum(c == 0 for sel in selection.layers.values() for c in sel.kept_counts) / (32 * 8)
    assert zero_heads == pytest.approx(0.184, abs=0.001)
    adapter.apply(model, selection)
    context = 1024
    metrics = {m.name: m.value for m in adapter.bytes_metrics(model, selection, context=context)}
    middle = (context - 16 - 64) / context
    assert metrics["kv_bytes_dense"] == 2 * 32 * 8 * 128 * context * 2  # K and V, bf16
    assert metrics["k_reduction"] == pytest.approx((1 - 0.3125) * middle)
    # heads that keep no channel drop their middle values too, and hold one fp32 running sum each
    dense_v = metrics["kv_bytes_dense"] / 2
    n_zero = round(zero_heads * 32 * 8)
    assert metrics["v_reduction"] == pytest.approx(zero_heads * middle - n_zero * 128 * 4 / dense_v)


@needs_masks
def test_a_mask_for_another_model_is_a_clear_error():
    with pytest.raises(
        HarnessError,
        match=r"is \[28, 4, 128\] \[layers, KV heads, head_dim\], the model's attention "
        r"is \[4, 4, 32\]",
    ):  # at planning: before any cell runs
        plan("llama-tiny", "leank", [0.5], method_params={"mask": str(MASKS / "qwen2.5-7b-instruct.pth")})


def test_cli_runs_leank_with_a_mask_file(tmp_path):
    from typer.testing import CliRunner

    from harness.cli import app
    from harness.store import ResultStore

    mask = torch.zeros(4, 4, 32)
    mask[:, :2, :8] = 1  # two heads keep 8 channels, two keep none: kept fraction 1/8
    torch.save(mask, tmp_path / "mask.pth")
    store = tmp_path / "r.sqlite"
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--model",
            "llama-tiny",
            "--method",
            "leank",
            "--mask",
            str(tmp_path / "mask.pth"),
            "--suite",
            "ppl",
            "--suite-param",
            "ppl.limit=600",
            "--store",
            str(store),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = ResultStore(store).table(method="leank")
    assert {r["ratio"] for r in rows} == {0.875}
    values = {r["metric"]: r["value"] for r in rows if r["suite"] == "compression"}
    assert values["kept_ratio"] == 0.125 and values["v_reduction"] > 0
    bad = CliRunner().invoke(
        app,
        [
            "run",
            "--model",
            "llama-tiny",
            "--method",
            "leank",
            "--mask",
            str(tmp_path / "nope.pth"),
            "--store",
            str(store),
            "-q",
        ],
    )
    assert bad.exit_code == 2 and "not found" in bad.output
    torch.save(torch.zeros(4, 4, 32), tmp_path / "zeros.pth")
    zeros = CliRunner().invoke(
        app,
        [
            "run",
            "--model",
            "llama-tiny",
            "--method",
            "leank",
            "--mask",
            str(tmp_path / "zeros.pth"),
            "--store",
            str(store),
            "-q",
        ],
    )
    assert zeros.exit_code == 2 and "keeps no key channel at all" in zeros.output
    torch.save(torch.ones(3, 4, 32), tmp_path / "other.pth")
    fresh = tmp_path / "fresh.sqlite"
    shape = CliRunner().invoke(
        app,
        [
            "run",
            "--model",
            "llama-tiny",
            "--method",
            "leank",
            "--mask",
            str(tmp_path / "other.pth"),
            "--suite",
            "ppl",
            "--store",
            str(fresh),
            "-q",
        ],
    )
    assert shape.exit_code == 2 and "the model's attention is [4, 4, 32]" in shape.output
    assert ResultStore(fresh).table() == []  # refused before the dense cells ran
