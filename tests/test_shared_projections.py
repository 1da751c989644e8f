"""Sibling projections run as one GEMM (harness/shared_projections.py): which layers group, the
weights regrouped in place (same values, same bytes, no second copy) and given back, the routed
forward equal to the plain one with fewer GEMMs, and the decode loop through it equal to eager
`generate` for every family it serves."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from harness import graph_decode
from harness.shared_projections import SharedProjections, sibling_groups
from test_graph_decode import hybrid, linear, realized
from test_kcache import generate, padded_batch, tiny_softmax


def storage_bytes(model) -> int:
    """Bytes of the distinct storages under the model's parameters."""
    seen = {}
    for p in model.parameters():
        storage = p.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def names_of(model, group) -> tuple[str, ...]:
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    return tuple(names[id(m)] for m in group)


class CountGemms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: linear("deltanet", False), {("q_proj", "k_proj", "v_proj", "b_proj"), ("gate_proj", "up_proj")}),
        (
            lambda: linear("gated_deltanet", True),
            {("q_proj", "k_proj", "v_proj", "b_proj", "a_proj", "g_proj"), ("gate_proj", "up_proj")},
        ),
        (lambda: tiny_softmax("qwen2"), {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}),
        (
            lambda: hybrid(True),
            {
                ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),
                ("q_proj", "k_proj", "v_proj"),
                ("gate_proj", "up_proj"),
            },
        ),
        (
            lambda: hybrid(False, "qwen3_next"),
            {("in_proj_qkvz", "in_proj_ba"), ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")},
        ),
    ],
    ids=["deltanet", "gated_deltanet-pruned", "qwen2", "qwen35-compressed", "qwen3_next"],
)
def test_sibling_projections_group_by_family(make, expected):
    model = make()
    assert {names_of(model, g) for g in sibling_groups(model)} == expected


def test_grouping_keeps_values_and_bytes_and_restore_gives_storage_back(tmp_path):
    """Members become row blocks of one matrix (the old storage freed: the bytes stay the same);
    values are bit-equal; `restore` gives each its own storage and the model saves and loads."""
    from transformers import AutoModelForCausalLM

    model = tiny_softmax("qwen2")  # q/k/v with biases
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bytes_before = storage_bytes(model)
    shared = SharedProjections(model)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    assert attn.q_proj.bias.untyped_storage().data_ptr() == attn.k_proj.bias.untyped_storage().data_ptr()
    assert storage_bytes(model) == bytes_before
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    shared.restore()
    assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.v_proj.weight.untyped_storage().data_ptr()
    assert storage_bytes(model) == bytes_before
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(p, before[n]) for n, p in loaded.named_parameters())


@pytest.mark.parametrize(
    "make", [lambda: linear("gated_deltanet", True), lambda: hybrid(True), lambda: tiny_softmax("llama")]
)
def test_routed_forward_equals_plain_with_fewer_gemms(make):
    model = make()
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        plain = CountGemms()
        with plain:
            expected = model(ids).logits
        shared = SharedProjections(model)
        routed = CountGemms()
        with shared.routed(), routed:
            got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    saved = sum(len(g.members) - 1 for g in shared.groups)  # one GEMM per group instead of one per member
    assert routed.count == plain.count - saved
    assert all(g.last is None for g in shared.groups)  # nothing held after the step


def test_a_member_on_another_or_a_modified_tensor_runs_its_own_gemm():
    layer = nn.Module()
    layer.q_proj, layer.k_proj = nn.Linear(8, 4), nn.Linear(8, 6)
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    expected = layer.q_proj(x), layer.k_proj(y), layer.k_proj(x + 1)
    shared = SharedProjections(layer)
    with torch.no_grad(), shared.routed():
        q, k_other = layer.q_proj(x), layer.k_proj(y)
        x.add_(1)  # the same object, modified in place: its version moved
        k_modified = layer.k_proj(x)
    for got, want in zip((q, k_other, k_modified), expected):
        torch.testing.assert_close(got, want)


def test_a_group_whose_weight_was_replaced_is_not_routed():
    layer = nn.Module()
    layer.gate_proj, layer.up_proj = nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False)
    shared = SharedProjections(layer)
    layer.up_proj.weight = nn.Parameter(torch.randn(4, 8))
    x = torch.randn(2, 8)
    with torch.no_grad(), shared.routed():
        assert "forward" not in layer.up_proj.__dict__
        torch.testing.assert_close(layer.up_proj(x), x @ layer.up_proj.weight.T)


MODELS = {
    "deltanet-pruned": lambda: linear("deltanet", True),
    "gated_deltanet": lambda: linear("gated_deltanet", False),
    "hybrid-compressed": lambda: hybrid(True),
    "llama-realized": lambda: realized("llama"),
    "qwen2": lambda: tiny_softmax("qwen2"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_loop_with_shared_projections_decodes_like_generate(name, tmp_path):
    """The CPU loop with the projections grouped (a graph's default on CUDA) against eager
    `generate`; then `release` gives the weights their own storage and the model saves."""
    model = MODELS[name]()
    ids, mask = padded_batch(vocab=100)
    seq, scores = generate(model, ids, mask, new=10)
    bytes_before = storage_bytes(model)
    rows = graph_decode.rows_of(ids, mask)
    dec = graph_decode.decoder(
        model,
        len(rows),
        graph_decode.capacity_for(ids.shape[1], 10),
        max_new_tokens=10,
        pad=0,
        eos=graph_decode.eos_ids(model, None),
        record_logits=True,
        shared_projections=True,
    )
    assert dec.projections.groups and storage_bytes(model) == bytes_before
    n, _ = dec.decode(dec.prefill(ids, mask), 10)
    out = dec.result(ids, n)
    assert torch.equal(out.sequences, seq)
    torch.testing.assert_close(out.logits, scores, atol=2e-5, rtol=1e-5)
    graph_decode.release(model)
    assert storage_bytes(model) == bytes_before
    model.save_pretrained(tmp_path)  # no weights share storage any more


def test_the_switch_and_the_default(monkeypatch):
    """Grouped by default only with a graph (CUDA); `HARNESS_SHARED_PROJECTIONS=off` keeps them apart."""
    assert graph_decode.shares_projections(True) and not graph_decode.shares_projections(False)
    monkeypatch.setenv(graph_decode.SHARED_PROJECTIONS_ENV, "off")
    assert not graph_decode.shares_projections(True)
    monkeypatch.setenv(graph_decode.SHARED_PROJECTIONS_ENV, "no")
    with pytest.raises(ValueError, match="must be on or off"):
        graph_decode.shares_projections(True)
    monkeypatch.delenv(graph_decode.SHARED_PROJECTIONS_ENV)
    dec = graph_decode.Decoder(tiny_softmax("llama"), 1, 64, max_new_tokens=2)  # CPU: no graph, none grouped
    assert dec.projections is None
