"""Hybrid models of transformers (Qwen3.5, Qwen3.5-MoE, Qwen3-Next, OLMo-hybrid): the Gated
DeltaNet adapter (identity, slicing == zero-masking, save/reload), the hybrid adapter (both
parts in one selection, bytes of both), runs with --method and --attn-method, and the real
Qwen3.5-0.8B geometry on the meta device."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.errors import HarnessError
from harness.families import adapter_for
from harness.families.hf_linear import OPS, HFGatedDeltaNetAdapter, gdn_layers, replaced_ops
from harness.families.hybrid import HybridAdapter
from harness.method import ACTIVATIONS, GRADIENTS, INPUTS
from harness.methods.drrqr import DRRQR
from harness.methods.random import RandomChannels as Random

LAYER_TYPES = ["linear_attention"] * 3 + ["full_attention"]
COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
    layer_types=LAYER_TYPES,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
ARCHITECTURES = {
    "qwen3_5_text": {},
    "qwen3_5_moe_text": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
    ),
    "qwen3_next": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
    ),
    "olmo_hybrid": {},
}


def tiny_hybrid(model_type: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **COMMON, **ARCHITECTURES[model_type]))
    with torch.no_grad():  # random init leaves channels alike; perturb so choices matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def kernel_scale(model, head_dim: int):
    """Make the delta-rule ops scale queries by head_dim**-0.5 whatever d_k they receive: the one
    difference between a sliced and a zero-masked layer (docs/design-notes.md)."""

    def rescaled(_name, op):
        def call(q, k, v, *args, **kwargs):
            kwargs["use_qk_l2norm_in_kernel"] = False
            q = torch.nn.functional.normalize(q.float(), dim=-1, eps=1e-6) * (q.shape[-1] / head_dim) ** 0.5
            return op(q, torch.nn.functional.normalize(k.float(), dim=-1, eps=1e-6), v, *args, **kwargs)

        return call

    return replaced_ops(gdn_layers(model), OPS, rescaled)


@pytest.fixture(params=list(ARCHITECTURES))
def architecture(request):
    return request.param


def linear_selection(model, ratio=0.5, method=None):
    adapter = HFGatedDeltaNetAdapter()
    method = method or DRRQR()
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    return method.select(adapter.capture(model, [ids], method.needs), ratio, "gated_deltanet")


def test_gated_deltanet_layers_slice_like_zero_masking_and_reload(architecture, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_hybrid(architecture)
    adapter = HFGatedDeltaNetAdapter()
    assert sorted(adapter.geometry(model)) == [0, 1, 2] and adapter.geometry(model)[0] == (2, 16, 16)
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
        identity = copy.deepcopy(model)
        adapter.apply(identity, adapter.full_selection(model))
        assert torch.equal(identity(ids).logits, dense)  # ratio 0 is the identity

        selection = linear_selection(model)
        sliced, zeroed = copy.deepcopy(model), copy.deepcopy(model)
        adapter.apply(sliced, selection)
        adapter.zero(zeroed, selection)
        assert sliced.config.linear_key_head_dim == 8
        assert all(
            a.head_k_dim == 8 and a.conv1d.weight.shape[0] == 2 * 16 + a.value_dim for _, a in gdn_layers(sliced)
        )
        with kernel_scale(sliced, 16), kernel_scale(zeroed, 16):
            assert torch.allclose(sliced(ids).logits, zeroed(ids).logits, atol=1e-5)
        assert not torch.allclose(sliced(ids).logits, dense, atol=1e-3)  # it did prune something

        sliced.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers
        assert reloaded.config.linear_key_head_dim == 8
        assert torch.equal(reloaded(ids).logits, sliced(ids).logits)
        # the smaller state in decoding: transformers' own cache takes the sliced shapes
        out = reloaded.generate(ids[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 12)


def test_capture_gives_what_each_method_needs():
    model = tiny_hybrid("qwen3_5_text")
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    data = HFGatedDeltaNetAdapter().capture(model, [ids], frozenset({ACTIVATIONS, INPUTS, GRADIENTS}))
    assert [d.index for d in data] == [0, 1, 2]
    first = data[0]
    attn = gdn_layers(model)[0][1]
    assert first.q_weight.shape == first.k_weight.shape == first.q_grad.shape == (2 * 16, 64)
    # the q rows are the first key_dim rows of the fused projection, the k rows the next ones
    assert torch.equal(first.q_weight, attn.in_proj_qkv.weight[:32].float())
    assert torch.equal(first.k_weight, attn.in_proj_qkv.weight[32:64].float())
    assert first.x_sq.shape == (64,) and first.q.shape[1:] == (2, 16)
    # Gram-exact: the captured factor reproduces the Gram matrix of the recorded q activations
    assert torch.isfinite(first.q).all() and (first.k.norm() > 0)


def test_planted_channels_are_found_in_hybrid_linear_layers():
    """Known answer: keys whose energy sits in channels 0..7 of every head (the others scaled
    down 100x) make an activation-based method keep exactly those channels."""
    model = tiny_hybrid("qwen3_5_text")
    with torch.no_grad():
        for _, attn in gdn_layers(model):
            for start in (0, attn.key_dim):  # the q and k rows of the fused projection
                for h in range(attn.num_k_heads):
                    rows = slice(start + h * 16 + 8, start + (h + 1) * 16)
                    attn.in_proj_qkv.weight[rows] *= 0.01
    selection = linear_selection(model, 0.5)
    assert all(kept == tuple(range(8)) for layer in selection.layers.values() for kept in layer.kept)


def test_hybrid_selection_holds_both_parts_and_their_bytes():
    model = tiny_hybrid("qwen3_5_text")
    adapter = adapter_for(model)
    assert isinstance(adapter, HybridAdapter) and adapter.family == "qwen3_5"
    assert adapter.attention_ids(model) == [3]
    linear = linear_selection(model, 0.5, Random())
    softmax = Random().select(adapter.part("softmax").capture(model, [], Random.needs), 0.75, "attention")
    both = adapter.combine(model, linear, softmax)
    assert sorted(both.layers) == [0, 1, 2, 3] and both.method == "random+random"
    parts = adapter.split(model, both)
    assert parts["linear"].layers == linear.layers and parts["softmax"].layers == softmax.layers
    compressed = copy.deepcopy(model)
    adapter.apply(compressed, both)
    assert compressed.config.linear_key_head_dim == 8
    assert compressed.model.layers[3].self_attn.key_plan.kept == softmax.layers[0].kept
    metrics = {m.name: m.value for m in adapter.bytes_metrics(compressed, both)}
    # linear state: 3 layers x 4 value heads x d_k x d_v fp32, d_k 16 -> 8
    assert metrics["state_bytes_dense"] == 3 * 4 * 16 * 8 * 4 and metrics["state_bytes"] == 3 * 4 * 8 * 8 * 4
    assert metrics["linear_kept_ratio"] == 0.5 and metrics["attention_kept_ratio"] == 0.25
    assert metrics["bytes_dense"] == metrics["state_bytes_dense"] + metrics["kv_bytes_dense"]
    assert metrics["bytes"] == metrics["state_bytes"] + metrics["kv_bytes"] < metrics["bytes_dense"]
    # decoding the compressed hybrid with its pruned K cache equals its dense masked reference
    ids = torch.randint(3, 128, (2, 150), generator=torch.Generator().manual_seed(2))
    reference = copy.deepcopy(model)  # sliced linear layers, dense masked attention (no pruned cache)
    adapter.part("linear").apply(reference, parts["linear"])
    adapter.part("softmax").zero(reference, parts["softmax"])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    pruned, dense = compressed.generate(ids, **kwargs), reference.generate(ids, **kwargs)
    assert torch.equal(pruned.sequences, dense.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(pruned.scores, dense.scores)) < 1e-4


def test_real_qwen35_geometry_compresses_and_reports_bytes_on_the_meta_device():
    from harness.model_shapes import random_model

    model = random_model("qwen3.5-0.8b")  # 24 layers, no weights in memory
    adapter = adapter_for(model)
    assert adapter.attention_ids(model) == [3, 7, 11, 15, 19, 23]
    assert adapter.part("linear").geometry(model)[0] == (16, 128, 128)
    linear = Random().select(adapter.part("linear").capture(model, [], Random.needs), 0.5, "gated_deltanet")
    softmax = Random().select(adapter.part("softmax").capture(model, [], Random.needs), 0.5, "attention")
    both = adapter.combine(model, linear, softmax)
    dense = {m.name: m.value for m in adapter.bytes_metrics(model, adapter.full_selection(model))}
    adapter.apply(model, both)
    assert model.config.linear_key_head_dim == 64
    assert gdn_layers(model)[0][1].in_proj_qkv.weight.shape == (2 * 16 * 64 + 16 * 128, 1024)
    after = {m.name: m.value for m in adapter.bytes_metrics(model, both)}
    state = 18 * 16 * 128 * 128 * 4  # 18 linear layers x 16 heads x d_k x d_v, fp32
    assert dense["state_bytes"] == after["state_bytes_dense"] == state and after["state_bytes"] == state // 2
    kv = 6 * 2 * 2 * 256 * 4096 * 4  # 6 attention layers x K and V x 2 KV heads x 256 x 4096 tokens, fp32
    assert dense["kv_bytes"] == after["kv_bytes_dense"] == kv
    middle = (4096 - 16 - 64) / 4096
    assert after["k_reduction"] == pytest.approx(0.5 * middle)
    assert after["bytes"] < dense["bytes"]


def test_method_routing_and_clear_errors(tmp_path):
    from transformers import AutoTokenizer

    from harness.compress import plan
    from harness.zoo import default_path

    folder = tmp_path / "hybrid"
    tiny_hybrid("qwen3_5_text").save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_path("llama-tiny")).save_pretrained(folder)
    both = plan(str(folder), "drrqr", [0.5], attn_method="magnitude")
    assert [(p.kind, p.selector.name) for p in both.parts] == [("linear", "drrqr"), ("softmax", "magnitude")]
    assert both.method_name == "drrqr+magnitude" and set(both.method_key()) == {"linear", "softmax"}
    assert [p.kind for p in plan(str(folder), "l1", [0.5]).parts] == ["linear"]  # linear-only method
    assert [p.kind for p in plan(str(folder), "think", [0.5]).parts] == ["softmax"]  # attention-only method
    with pytest.raises(HarnessError, match="--attn-method l1 supports"):
        plan(str(folder), "drrqr", [0.5], attn_method="l1")
    with pytest.raises(HarnessError, match="goes to the linear layers"):
        plan(str(folder), "think", [0.5], attn_method="leank")
    with pytest.raises(HarnessError, match="pca projects key channels"):
        plan(str(folder), "pca", [0.5])
    with pytest.raises(HarnessError, match="--attn-method applies to hybrid models"):
        plan("llama-tiny", "drrqr", [0.5], attn_method="leank")


SMALL_SUITES = [
    "ppl.limit=1024",
    "lm-eval.limit=8",
    "mqar.kv_pairs=4",
    "mqar.seq_lens=128",
    "mqar.limit=8",
    "ruler.lengths=256",
    "ruler.limit=1",
    "ruler.tasks=niah_single,vt",
    "state-rank.num_sequences=2",
    "state-rank.seq_len=64",
    "state-rank.batch_size=2",
    "speed.contexts=32",
    "speed.batches=1",
    "speed.new_tokens=3",
    "speed.repeats=1",
    "speed.warmup=0",
]


@pytest.mark.slow
def test_every_suite_runs_on_the_zoo_hybrid_and_the_leaderboard_shows_both_parts(tmp_path, monkeypatch):
    import json

    from streamlit.testing.v1 import AppTest
    from typer.testing import CliRunner

    from harness.cli import app
    from harness.leaderboard import APP, data

    store = tmp_path / "r.sqlite"
    args = [
        "run",
        "--model",
        "qwen35-hybrid-tiny",
        "--method",
        "drrqr",
        "--attn-method",
        "leank",
        "--attn-param",
        "steps=20",
        "--attn-param",
        "steps2=10",
        "--attn-param",
        "pool=2",
        "--ratio",
        "0.5",
        "--suite",
        "all",
        "--store",
        str(store),
        "-q",
    ]
    for pair in SMALL_SUITES:
        args += ["--suite-param", pair]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output

    monkeypatch.setenv("HARNESS_STORE", str(store))
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception
    table = at.dataframe[0].value.set_index("method")
    assert list(table.index) == ["dense", "drrqr+leank"] and set(table["family"]) == {"qwen3_5"}
    row = table.loc["drrqr+leank"]
    assert row["compression.linear_kept_ratio"] == 0.5 and row["compression.attention_kept_ratio"] == 0.5
    assert row["compression.state_bytes"] == table.loc["dense", "compression.state_bytes"] / 2
    assert row["compression.kv_bytes"] < table.loc["dense", "compression.kv_bytes"]
    for suite in (
        "ppl.ppl",
        "lm-eval.avg_acc",
        "mqar.acc",
        "ruler.avg",
        "state-rank.u_final_mean",
        "state-rank.key_u_mean",
        "speed.decode_ms_per_token",
    ):
        assert suite in table.columns and table[suite].notna().all(), suite
    assert row["speed.decode_speedup"] > 0  # measured against the dense model inside the compressed cell
    rank = next(t for t in at.tabs if t.label == "state rank")
    assert {"u_final", "key_u"} <= set(rank.selectbox(key="rank_quantity").options)
    runs = data.load(store).runs
    key = runs[(runs["method"] == "drrqr+leank") & (runs["suite"] == "compression")]["run_key"].iloc[0]
    at.selectbox(key="detail_cell").set_value(key).run()
    shown = json.loads(next(t for t in at.tabs if t.label == "run detail").json[0].proto.body)
    assert shown["method"] == "drrqr+leank"
    assert (
        shown["method_params"]["linear"]["method"] == "drrqr" and shown["method_params"]["softmax"]["method"] == "leank"
    )


@pytest.mark.parametrize("method", ["drrqr", "qrcp", "l1", "wanda", "grad", "random", "magnitude"])
def test_every_linear_method_compresses_the_hybrid_linear_layers(method):
    from harness.registry import build_method

    model = tiny_hybrid("qwen3_5_text")
    selector = build_method(method, {}, seed=0)
    selection = linear_selection(model, 0.25, selector)
    assert selection.kept_ratio == 0.75
    HFGatedDeltaNetAdapter().apply(model, selection)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    assert model.config.linear_key_head_dim == 12 and torch.isfinite(model(ids).logits).all()
