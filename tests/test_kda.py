"""Kimi Delta Attention (fla KDA): the CPU reference kernels against fla's own torch references,
the routing, and the family adapter (identity, slicing == zeroing, the per-channel gate sliced with
its channel, plain-fla reload, a planted-channel known answer, every linear method)."""

import copy
import functools

import fla.layers.kda
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fla.ops.kda.gate import naive_kda_gate, naive_kda_lowerbound_gate
from fla.ops.kda.naive import naive_chunk_kda, naive_recurrent_kda
from transformers import AutoModelForCausalLM

from harness.families import adapter_for
from harness.families.fla_kda import KDAAdapter, gate_rows
from harness.kernels import fla_cpu, kda
from harness.methods.random import RandomChannels

D = 32  # key head dim of the tiny models
TOKENS = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))  # <= 64: fused_recurrent
LONG = torch.randint(3, 128, (2, 150), generator=torch.Generator().manual_seed(1))  # > 64: chunk


def tiny_kda(seed: int = 0, **over):
    from fla.models import KDAConfig

    values = dict(
        hidden_size=64,
        num_hidden_layers=2,
        vocab_size=128,
        bos_token_id=1,
        eos_token_id=2,
        num_heads=2,
        head_dim=D,
        expand_v=1.0,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(KDAConfig(**{**values, **over}))
    with torch.no_grad():  # random init leaves q/k near-identical in scale; perturb so choices matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


VARIANTS = {
    "plain": {},
    "gva": dict(num_v_heads=4),  # 2 value heads per key head: each keeps its key head's gate channels
    "safe_gate": dict(safe_gate=True, lower_bound=-5.0),  # gate = lower_bound * sigmoid(...)
}


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    return VARIANTS[request.param]


@pytest.fixture
def kernel_scale(monkeypatch):
    """Force KDA's output scale (default d_k ** -0.5 of the tensors given, so a sliced and a zeroed
    layer differ by that factor before the output norm): at one scale slicing must be exact."""

    def force(scale: float) -> None:
        for name in ("chunk_kda", "fused_recurrent_kda"):
            monkeypatch.setattr(fla.layers.kda, name, functools.partial(getattr(fla.layers.kda, name), scale=scale))

    return force


def logits(model, ids=TOKENS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def random_selection(model, ratio, seed=0):
    adapter = adapter_for(model)
    return adapter, RandomChannels(seed=seed).select(
        adapter.capture(model, [], RandomChannels.needs), ratio, adapter.family
    )


# ---------------------------------------------------------------------------------------------
# the reference kernels


def _inputs(B=2, T=128, H=2, HV=4, K=16, V=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(B, T, HV, V, generator=gen)
    g = -2 * torch.rand(B, T, HV, K, generator=gen)  # log decays, per key channel
    beta = torch.rand(B, T, HV, generator=gen)
    h0 = torch.randn(B, HV, K, V, generator=gen)
    return q, k, v, g, beta, h0


@pytest.mark.parametrize("fn", [kda.fused_recurrent_kda, kda.chunk_kda], ids=["recurrent", "chunk"])
def test_references_match_fla_naive_kda(fn):
    """fla's naive_recurrent_kda / naive_chunk_kda (plain torch, float32, GVA, initial state)."""
    q, k, v, g, beta, h0 = _inputs()
    want_o, want_s = naive_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    chunk_o, chunk_s = naive_chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, want_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o, chunk_o, rtol=1e-4, atol=1e-4)  # fla's own two references agree less closely
    torch.testing.assert_close(s, chunk_s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lower_bound", [None, -5.0, -2.0])
@pytest.mark.parametrize("with_a", [True, False])
def test_gate_matches_fla_naive_gates(lower_bound, with_a):
    if lower_bound is None and not with_a:
        with pytest.raises(ValueError, match="A_log"):
            kda.kda_gate(torch.zeros(1, 1, 2, 4), None)
        return
    gen = torch.Generator().manual_seed(0)
    raw, A_log, dt_bias = (
        torch.randn(2, 5, 3, 8, generator=gen),
        torch.randn(3, generator=gen),
        torch.randn(24, generator=gen),
    )
    A = A_log if with_a else None
    want = (
        naive_kda_gate(raw, A_log, dt_bias)
        if lower_bound is None
        else naive_kda_lowerbound_gate(raw, A, dt_bias, lower_bound=lower_bound)
    )
    got = kda.kda_gate(raw, A, dt_bias, lower_bound)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (got <= 0).all() and (lower_bound is None or (got >= lower_bound).all())  # float32 saturates


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(lower_bound=-5.0, safe_gate=True),
        dict(lower_bound=-3.0),
        dict(allow_neg_eigval=True),
    ],
    ids=["softplus", "safe_gate", "lower_bound", "neg_eigval"],
)
def test_in_kernel_options_equal_naive_on_activated_inputs(options):
    """use_qk_l2norm / use_gate / use_beta_sigmoid / allow_neg_eigval / state_v_first, as the layer
    calls them: both entry points equal fla's naive recurrence fed the activated tensors."""
    q, k, v, raw, beta_raw, h0 = _inputs(T=70, seed=3)
    q, k = 3 * q + 0.1, 2 * k - 0.1  # not unit-norm: the in-kernel norm matters
    gen = torch.Generator().manual_seed(4)
    A_log, dt_bias = torch.randn(4, generator=gen), torch.randn(4 * 16, generator=gen)
    lower_bound = options.get("lower_bound")
    g = (
        naive_kda_gate(raw, A_log, dt_bias)
        if lower_bound is None
        else naive_kda_lowerbound_gate(raw, A_log, dt_bias, lower_bound=lower_bound)
    )
    beta = beta_raw.sigmoid() * (2 if options.get("allow_neg_eigval") else 1)
    l2 = lambda x: x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)  # noqa: E731  fla's l2norm
    want_o, want_s = naive_recurrent_kda(l2(q), l2(k), v, g, beta, initial_state=h0, output_final_state=True)
    common = dict(
        initial_state=h0.transpose(-1, -2).contiguous(),
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
        use_gate_in_kernel=True,
        use_beta_sigmoid_in_kernel=True,
        state_v_first=True,
        A_log=A_log,
        dt_bias=dt_bias,
        allow_neg_eigval=options.get("allow_neg_eigval", False),
        lower_bound=lower_bound,
    )
    outs = [
        kda.fused_recurrent_kda(q, k, v, raw, beta_raw, **common),
        kda.chunk_kda(q, k, v, raw, beta_raw, safe_gate=options.get("safe_gate", False), **common),
    ]
    for o, s in outs:
        torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.transpose(-1, -2), want_s, rtol=1e-5, atol=1e-5)  # [N, HV, V, K]


def test_varlen_equals_separate_sequences_and_checks_like_fla():
    q, k, v, g, beta, h0 = _inputs(B=2, T=50, seed=5)
    lens = [17, 50]
    pack = lambda x: torch.cat([x[0, : lens[0]], x[1, : lens[1]]]).unsqueeze(0)  # noqa: E731
    cu = torch.tensor([0, lens[0], sum(lens)])
    o, s = kda.chunk_kda(
        *(pack(x) for x in (q, k, v, g, beta)), initial_state=h0, output_final_state=True, cu_seqlens=cu
    )
    for i, n in enumerate(lens):
        oi, si = kda.fused_recurrent_kda(
            *(x[i : i + 1, :n] for x in (q, k, v, g, beta)), initial_state=h0[i : i + 1], output_final_state=True
        )
        torch.testing.assert_close(o[0, cu[i] : cu[i + 1]], oi[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s[i], si[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="safe range"):
        kda.chunk_kda(q, k, v, g, beta, use_gate_in_kernel=True, A_log=torch.zeros(4), safe_gate=True, lower_bound=-6.0)
    with pytest.raises(ValueError, match="chunk_size"):
        kda.chunk_kda(q, k, v, g, beta, chunk_size=16)
    with pytest.raises(TypeError, match="unsupported argument"):
        kda.chunk_kda(q, k, v, g, beta, gk=g)


def test_chunk_and_recurrent_gradients_agree():
    """Both references are differentiated by autograd (the chunked one trains the zoo model)."""
    q, k, v, raw, beta, h0 = (x.double().requires_grad_() for x in _inputs(B=1, T=37, K=8, V=4, seed=6))
    A_log, dt_bias = (
        torch.zeros(4, dtype=torch.float64, requires_grad=True),
        torch.zeros(32, dtype=torch.float64, requires_grad=True),
    )
    grads = []
    for fn in (kda.fused_recurrent_kda, kda.chunk_kda):
        o, s = fn(
            q,
            k,
            v,
            raw,
            beta,
            A_log=A_log,
            dt_bias=dt_bias,
            initial_state=h0,
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
            use_gate_in_kernel=True,
            use_beta_sigmoid_in_kernel=True,
        )
        grads.append(torch.autograd.grad((o**2).sum() + s.sum(), (q, k, v, raw, beta, A_log, dt_bias, h0)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_fla_kda_entry_points_are_routed():
    names = fla_cpu.patches()
    for name in (
        "fla.layers.kda.chunk_kda",
        "fla.layers.kda.fused_recurrent_kda",
        "fla.ops.kda.chunk.chunk_kda",
        "fla.ops.kda.fused_recurrent.fused_recurrent_kda",
    ):
        assert name in names
    assert fla.layers.kda.chunk_kda._harness_reference is kda.chunk_kda


def test_model_chunk_and_recurrent_modes_agree(variant):
    """The layer takes fused_recurrent for <= 64 tokens and chunk beyond: the same function."""
    model = tiny_kda(**variant)
    full = logits(model, LONG)  # chunk mode
    for layer in model.model.layers:
        layer.attn.mode = "fused_recurrent"
    with torch.no_grad():
        out = model(input_ids=LONG[:, :64], use_cache=True)
        step = model(input_ids=LONG[:, 64:65], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(out.logits, full[:, :64], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step[:, 0], full[:, 64], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# the adapter


def test_adapter_and_geometry():
    model = tiny_kda(num_v_heads=4)
    adapter = adapter_for(model)
    assert isinstance(adapter, KDAAdapter) and adapter.family == "kda" and adapter.kind == "linear"
    assert adapter.geometry(model) == {0: (2, D, 64), 1: (2, D, 64)}  # 2 value heads of 32 per key head


def test_ratio_zero_is_identity(variant):
    model = tiny_kda(**variant)
    before, config_before = logits(model), model.config.to_dict()
    adapter, selection = random_selection(model, 0.0)
    adapter.apply(model, selection)
    assert torch.equal(logits(model), before)
    assert model.config.to_dict() == config_before


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("ids", [TOKENS, LONG], ids=["recurrent", "chunk"])
def test_slicing_equals_zeroing(variant, ratio, ids, kernel_scale):
    model = tiny_kda(**variant)
    adapter, selection = random_selection(model, ratio, seed=1)
    zeroed, sliced = copy.deepcopy(model), copy.deepcopy(model)
    adapter.zero(zeroed, selection)
    adapter.apply(sliced, selection)
    keep = D - int(D * ratio)
    attn = sliced.model.layers[0].attn
    hv = attn.num_v_heads
    assert attn.head_k_dim == keep and attn.head_v_dim == D
    assert attn.q_proj.weight.shape[0] == attn.k_conv1d.weight.shape[0] == 2 * keep
    assert attn.f_proj[1].weight.shape[0] == attn.dt_bias.shape[0] == hv * keep  # the decays went with the channels
    dense = logits(model, ids)
    kernel_scale(keep**-0.5)
    ref, got = logits(zeroed, ids), logits(sliced, ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref, dense, atol=1e-3)  # pruning did change the function


def test_each_value_head_keeps_its_key_heads_gate_channels():
    model = tiny_kda(num_v_heads=4)
    attn = model.model.layers[1].attn
    weight, bias = attn.f_proj[1].weight.clone(), attn.dt_bias.clone()
    adapter, selection = random_selection(model, 0.5, seed=3)
    kept = selection.layers[1].kept
    adapter.apply(model, selection)
    for hv in range(4):
        rows = [hv * D + c for c in kept[hv // 2]]
        assert torch.equal(attn.f_proj[1].weight[hv * 16 : (hv + 1) * 16], weight[rows])
        assert torch.equal(attn.dt_bias[hv * 16 : (hv + 1) * 16], bias[rows])
    assert gate_rows(type("L", (), dict(num_v_heads=4, num_heads=2, head_k_dim=4))(), ((0, 3), (1, 2))).tolist() == [
        0,
        3,
        4,
        7,
        9,
        10,
        13,
        14,
    ]


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_pruned_checkpoint_reloads_with_plain_fla(variant, ratio, tmp_path):
    model = tiny_kda(**variant)
    adapter, selection = random_selection(model, ratio, seed=2)
    adapter.apply(model, selection)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    keep = D - int(D * ratio)
    assert reloaded.config.head_dim == keep and int(reloaded.config.head_dim * reloaded.config.expand_v) == D
    assert reloaded.model.layers[0].attn.head_v_dim == D
    for ids in (TOKENS, LONG):
        torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=0)
    out = reloaded.generate(TOKENS[:1, :10], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (1, 16)


def test_projection_mixes_gate_rows_by_squared_weights():
    """PCA: rotated q/k, and per new channel the P^2-weighted gate row and bias (an approximation:
    the decay is diagonal in the old channels). A permutation matrix must equal plain slicing."""
    from harness.selection import ChannelSelection, LayerSelection

    model = tiny_kda(num_v_heads=4)
    adapter, selection = random_selection(model, 0.5, seed=4)
    layers = {}
    for i, sel in selection.layers.items():  # the same choice, written as a 0/1 projection
        proj = tuple(
            tuple(tuple(1.0 if c == kept[j] else 0.0 for j in range(len(kept))) for c in range(D)) for kept in sel.kept
        )
        layers[i] = LayerSelection(D, sel.value_dim, tuple(tuple(range(len(k))) for k in sel.kept), proj)
    as_projection = ChannelSelection(family="kda", layers=layers, method="pca", ratio=0.5)
    sliced, projected = copy.deepcopy(model), copy.deepcopy(model)
    adapter.apply(sliced, selection)
    adapter.apply(projected, as_projection)
    torch.testing.assert_close(logits(projected, LONG), logits(sliced, LONG), rtol=1e-5, atol=1e-5)


def test_capture_sees_what_the_kernel_is_fed():
    """Calibration captures q/k after the short conv (with it) or after the silu (without)."""
    from harness.method import ACTIVATIONS

    for conv in (True, False):
        model = tiny_kda(use_short_conv=conv)
        attn = model.model.layers[1].attn
        seen = []
        original = fla.layers.kda.chunk_kda

        def spy(q, k, *args, **kwargs):
            seen.append(k.detach().reshape(-1, 2, D))
            return original(q, k, *args, **kwargs)

        layer = adapter_for(model).capture(model, [LONG], frozenset({ACTIVATIONS}))[1]
        fla.layers.kda.chunk_kda = spy
        try:
            logits(model, LONG)
        finally:
            fla.layers.kda.chunk_kda = original
        full = seen[1].double()  # layer 1's keys as the kernel got them (before its L2 norm)
        for h in range(2):
            torch.testing.assert_close(
                layer.k[:, h].double().T @ layer.k[:, h].double(), full[:, h].T @ full[:, h], rtol=1e-5, atol=1e-4
            )
        assert attn.use_short_conv == conv


def _planted_model(seed):
    """Per key head, 8 planted key/query channels read independent directions of the hidden state
    (4 at scale 3, 4 at scale 1); 4 more are 0.9x copies of the strong ones (large norm, no new
    direction) and the rest tiny. The short convs pass the current token through (last tap 1)."""
    model = tiny_kda(seed=seed, num_hidden_layers=1)
    attn = model.model.layers[0].attn
    gen = torch.Generator().manual_seed(seed)
    planted = []
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.mul_(0.005)
        for h in range(2):
            perm = torch.randperm(D, generator=gen)
            chosen, copies = perm[:8], perm[8:12]
            planted.append(set(chosen.tolist()))
            for proj in (attn.q_proj, attn.k_proj):
                directions = torch.linalg.qr(torch.randn(64, 8, generator=gen)).Q.T * 8  # orthogonal rows
                directions *= torch.tensor([3.0] * 4 + [1.0] * 4)[:, None]
                proj.weight[h * D + chosen] = directions
                proj.weight[h * D + copies] = 0.9 * directions[:4]
        for conv in (attn.q_conv1d, attn.k_conv1d):
            conv.weight.zero_()
            conv.weight[:, 0, -1] = 1.0
    return model, planted


@pytest.mark.parametrize("seed", [0, 1])
def test_drrqr_finds_planted_channels_through_the_kda_adapter(seed):
    from harness.methods.drrqr import DRRQR

    model, planted = _planted_model(seed)
    adapter = adapter_for(model)
    batches = [torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(10 + seed))]
    layers = adapter.capture(model, batches, DRRQR.needs)
    selection = DRRQR(seed=seed).select(layers, 1 - 8 / D, adapter.family)
    assert [set(k) for k in selection.layers[0].kept] == planted
    # not trivial: the highest-energy channels include the copies
    for h, p in enumerate(planted):
        energy = (layers[0].q[:, h] ** 2).sum(0) + (layers[0].k[:, h] ** 2).sum(0)
        assert set(torch.argsort(energy, descending=True)[:8].tolist()) != p
    # and the planted channels' decays are the ones kept
    attn = model.model.layers[0].attn
    rows = gate_rows(attn, selection.layers[0].kept)
    weight = attn.f_proj[1].weight[rows].clone()
    adapter.apply(model, selection)
    assert torch.equal(attn.f_proj[1].weight, weight)


def _linear_methods():
    from harness import registry

    return [name for name in registry.names(registry.METHODS) if "deltanet" in registry.get_method(name).families]


def test_every_linear_method_declares_kda():
    methods = _linear_methods()
    assert {"drrqr", "qrcp", "l1", "wanda", "grad", "pca", "random", "magnitude"} <= set(methods)
    from harness import registry

    assert all("kda" in registry.get_method(name).families for name in methods)


@pytest.mark.parametrize("method", ["drrqr", "qrcp", "l1", "wanda", "grad", "pca", "random", "magnitude"])
def test_every_linear_method_runs_on_kda(method):
    from harness.registry import build_method

    model = tiny_kda(num_v_heads=4)
    adapter = adapter_for(model)
    selector = build_method(method, {}, seed=0)
    layers = adapter.capture(model, [LONG[:, :80], TOKENS], selector.needs)
    for ratio in (0.25, 0.5, 0.75):
        pruned = copy.deepcopy(model)
        selection = selector.select(layers, ratio, adapter.family)
        assert selection.kept_ratio == 1 - ratio
        adapter.apply(pruned, selection)
        keep = D - int(D * ratio)
        assert pruned.config.head_dim == keep and pruned.model.layers[1].attn.dt_bias.shape == (4 * keep,)
        out = logits(pruned, LONG)
        assert torch.isfinite(out).all()
        assert not np.allclose(out.numpy(), logits(model, LONG).numpy(), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# suites: state rank (recorded op calls replayed) and speed


def kda_cache_states(model, input_ids) -> list[torch.Tensor]:
    """Each layer's recurrent state from the model's own fla cache ([V, K] there), as [B, HV, d_k, d_v]."""
    with torch.no_grad():
        cache = model(input_ids=input_ids, use_cache=True).past_key_values
    return [cache[i]["recurrent_state"].transpose(-1, -2) for i in range(len(model.model.layers))]


@pytest.mark.parametrize(
    "over", [{}, dict(num_v_heads=4), dict(safe_gate=True, lower_bound=-5.0)], ids=["plain", "gva", "safe_gate"]
)
def test_state_rank_replays_kda_calls_to_the_layers_own_states(over):
    from harness.suites.state_rank import record_delta_rule_calls, replay_states

    model = tiny_kda(**over)
    layers = KDAAdapter().layers(model)
    ids = torch.randint(3, 128, (2, 80), generator=torch.Generator().manual_seed(1))  # > 64 tokens: chunk_kda
    with torch.no_grad(), record_delta_rule_calls(layers) as calls:
        model(input_ids=ids)
    final, prefix = kda_cache_states(model, ids), kda_cache_states(model, ids[:, :30])  # 30: fused_recurrent_kda
    for index, _ in layers:
        (call,) = calls[index]
        assert call.op == "chunk_kda"
        states = replay_states(call, [30, 80])
        torch.testing.assert_close(states[0], prefix[index].float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(states[1], final[index].float(), rtol=1e-4, atol=1e-5)


def test_state_rank_suite_on_a_pruned_kda_model(tmp_path, text_file, char_tokenizer):
    from harness.suite import SuiteContext
    from harness.suites import rank_metrics as rm
    from harness.suites.state_rank import StateRankSuite

    model = tiny_kda()
    adapter, selection = random_selection(model, 0.5)
    adapter.apply(model, selection)  # head_k_dim 32 -> 16
    suite = StateRankSuite(num_sequences=3, seq_len=40, every=16, batch_size=2, text_file=text_file)
    ctx = SuiteContext("kda", "cpu", 3, tmp_path / "artifacts", lambda _d, _t: lambda n=1: None)
    rows = {r.name: r for r in suite.run(model, char_tokenizer, ctx)}
    states = kda_cache_states(model, suite.sequences(char_tokenizer, ctx.seed))
    for layer, state in enumerate(states):
        assert state.shape[-2:] == (16, D)
        u = rm.rank_utilization(state).mean(0)
        for head in range(2):
            row = rows[f"u_final/L{layer}H{head}"]
            assert row.value == pytest.approx(u[head].item(), rel=1e-4) and row.details["d_k"] == 16


def test_kda_cache_bytes_shrink_with_the_key_channels():
    from harness.suites.speed import cache_bytes

    model = tiny_kda()
    with torch.no_grad():
        dense = cache_bytes(model(input_ids=TOKENS, use_cache=True).past_key_values)
    adapter, selection = random_selection(model, 0.5)
    adapter.apply(model, selection)
    with torch.no_grad():
        pruned = cache_bytes(model(input_ids=TOKENS, use_cache=True).past_key_values)
    # per layer: the state (2 sequences x 2 heads x d_v 32 x d_k, fp32) shrinks with d_k; so do the
    # q and k conv states (2 heads x d_k channels x 4 taps x 2 sequences; v's is untouched)
    state = lambda d: 2 * 2 * 32 * d * 4  # noqa: E731
    conv = lambda d: 2 * 4 * 4 * (2 * 2 * d + 2 * 32)  # noqa: E731
    assert dense - pruned == 2 * (state(32) - state(16) + conv(32) - conv(16))


# ---------------------------------------------------------------------------------------------
# the zoo's kda-tiny (trained), through the harness


def _zoo_kda():
    from harness import zoo

    # kda-tiny ships with the package: missing weights are a broken install, not a reason to skip
    assert zoo.manifest("kda-tiny") is not None, "kda-tiny's shipped weights are missing (harness zoo build kda-tiny)"


def test_trained_kda_tiny_slices_exactly(kernel_scale):
    import harness
    from harness.calibration import CalibrationSpec, calibration_batches
    from harness.methods.drrqr import DRRQR

    _zoo_kda()
    loaded = harness.load_model("kda-tiny")
    adapter = adapter_for(loaded.model)
    batches = calibration_batches(loaded.tokenizer, CalibrationSpec(samples=4, seq_len=128))
    selection = DRRQR().select(adapter.capture(loaded.model, batches, DRRQR.needs), 0.5, adapter.family)
    zeroed, sliced = copy.deepcopy(loaded.model), loaded.model
    adapter.zero(zeroed, selection)
    adapter.apply(sliced, selection)
    ids = batches[0][:2]
    at_own_scale = logits(sliced, ids)
    kernel_scale(16**-0.5)
    torch.testing.assert_close(logits(sliced, ids), logits(zeroed, ids), rtol=1e-5, atol=1e-4)
    # at its own default scale the output RMSNorm absorbs the factor almost entirely
    torch.testing.assert_close(at_own_scale, logits(zeroed, ids), rtol=0, atol=5e-2)


def test_speed_suite_on_kda_tiny(tmp_path):
    from harness.pipeline import run

    _zoo_kda()
    small = {"contexts": "32,96", "batches": "1,2", "new_tokens": 3, "warmup": 0, "repeats": 2}
    report = run(
        model="kda-tiny",
        method="random",
        ratios=[0.5],
        suites=["speed"],
        suite_params={"speed": small},
        store=tmp_path / "r.sqlite",
        progress=False,
    )
    ours = {r["metric"]: r["value"] for r in report.rows if r["suite"] == "speed" and r["method"] == "random"}
    for w in ("c32b1", "c32b2", "c96b1", "c96b2"):
        assert ours[f"decode_ms_per_token/{w}"] > 0 and ours[f"prefill_tokens_per_s/{w}"] > 0
        assert ours[f"cache_bytes/{w}"] < ours[f"dense_cache_bytes/{w}"]  # a smaller state, whatever the length


def test_static_decode_loop_does_not_claim_kda():
    """fla's KDA decode step returns a new state tensor, which a replayed CUDA graph cannot follow:
    the loop says so, and KDA decodes through generate."""
    from harness import graph_decode

    assert "model type 'kda'" in graph_decode.reason(tiny_kda())
