"""CPU references for fla's Triton kernels (harness.kernels) and the switch that routes fla to them.

Oracles: fla's own naive torch implementations (fla/ops/*/naive.py), torch's nn.Conv1d /
F.cross_entropy, the two forms of the recurrence against each other, and whole fla models
(cached generation against full re-forwards, padded batches against single sequences).
"""

from __future__ import annotations

import inspect
import time

import pytest
import torch
import torch.nn.functional as F

from harness.kernels import conv, delta_rule, fla_cpu, loss, norm
from harness.kernels.activations import swiglu, swiglu_linear
from harness.kernels.delta_rule import (
    delta_rule_chunk,
    delta_rule_recurrent,
    gated_delta_rule_chunk,
    gated_delta_rule_recurrent,
)


@pytest.fixture(scope="module", autouse=True)
def _installed():
    fla_cpu.install()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12)).item()


def assert_rel(got, ref, tol=1e-4):
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err = rel_err(got, ref)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def inputs(B, T, H, K, V, seed=0, HV=None, dtype=torch.float32):
    """Random delta-rule inputs in fla's [B, T, H, D] layout, keys unit-norm, decays in (-1, 0)."""
    g_ = gen(seed)
    HV = HV or H
    q = torch.randn(B, T, H, K, generator=g_)
    k = F.normalize(torch.randn(B, T, H, K, generator=g_), dim=-1)
    v = torch.randn(B, T, HV, V, generator=g_)
    beta = torch.rand(B, T, HV, generator=g_)
    g = F.logsigmoid(torch.randn(B, T, HV, generator=g_) + 2)
    h0 = torch.randn(B, HV, K, V, generator=g_)
    return tuple(x.to(dtype) for x in (q, k, v, beta, g, h0))


SHAPES = [  # B, T, H, K, V: odd T, T < and > one chunk, d_k != d_v, pruned head dims 24 and 8
    (2, 100, 3, 24, 40),
    (1, 64, 2, 32, 32),
    (3, 7, 2, 8, 16),
    (2, 130, 1, 16, 8),
]


# ---------------------------------------------------------------------------------------------
# against fla's naive references


@pytest.mark.parametrize("B,T,H,K,V", SHAPES)
@pytest.mark.parametrize("form", [delta_rule_recurrent, delta_rule_chunk])
def test_delta_rule_matches_fla_naive(form, B, T, H, K, V):
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    q, k, v, beta, _, h0 = inputs(B, T, H, K, V, seed=T)
    # fla's naive delta rule is head-first [B, H, T, D] with scale d_k ** -0.5
    o_ref, s_ref = delta_rule_recurrence(*(x.transpose(1, 2) for x in (q, k, v, beta)), initial_state=h0)
    o, s = form(q, k, v, beta, initial_state=h0, output_final_state=True)
    assert_rel(o, o_ref.transpose(1, 2))
    assert_rel(s, s_ref)
    assert s.dtype == torch.float32


def test_delta_rule_chunk_matches_fla_naive_chunkwise():
    from fla.ops.delta_rule.naive import delta_rule_chunkwise

    q, k, v, beta, _, _ = inputs(2, 128, 2, 16, 24, seed=5)
    o_ref, s_ref = delta_rule_chunkwise(*(x.transpose(1, 2) for x in (q, k, v, beta)), chunk_size=32)
    o, s = delta_rule_chunk(q, k, v, beta, output_final_state=True)
    assert_rel(o, o_ref.transpose(1, 2))
    assert_rel(s, s_ref)


@pytest.mark.parametrize("B,T,H,K,V", SHAPES)
@pytest.mark.parametrize("naive", ["naive_recurrent_gated_delta_rule", "naive_chunk_gated_delta_rule"])
@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_gated_delta_rule_matches_fla_naive(form, naive, B, T, H, K, V):
    from fla.ops.gated_delta_rule import naive as fla_naive

    q, k, v, beta, g, h0 = inputs(B, T, H, K, V, seed=T + 1)
    scale = 0.3
    o_ref, s_ref = getattr(fla_naive, naive)(
        q=q, k=k, v=v, beta=beta, g=g, scale=scale, initial_state=h0, output_final_state=True
    )
    if form == "recurrent":
        o, s = gated_delta_rule_recurrent(q, k, v, g, beta=beta, scale=scale, initial_state=h0, output_final_state=True)
    else:
        o, s = gated_delta_rule_chunk(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True)
    assert_rel(o, o_ref)
    assert_rel(s, s_ref)


def test_no_initial_state_and_no_final_state():
    q, k, v, beta, g, _ = inputs(2, 40, 2, 16, 16, seed=3)
    o, s = gated_delta_rule_chunk(q, k, v, g, beta)
    assert s is None
    o2, s2 = gated_delta_rule_chunk(q, k, v, g, beta, initial_state=torch.zeros(2, 2, 16, 16), output_final_state=True)
    assert_rel(o, o2, 1e-6)
    assert s2.shape == (2, 2, 16, 16)


def test_bf16_inputs_compute_in_fp32_and_return_bf16():
    q, k, v, beta, g, h0 = inputs(1, 70, 2, 16, 16, seed=4)
    o32, s32 = gated_delta_rule_chunk(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    args = [x.bfloat16() for x in (q, k, v, g, beta)]
    o16, s16 = gated_delta_rule_chunk(*args, initial_state=h0.bfloat16(), output_final_state=True)
    assert o16.dtype == torch.bfloat16 and s16.dtype == torch.float32
    assert rel_err(o16, o32) < 3e-2  # only the inputs were rounded


# ---------------------------------------------------------------------------------------------
# chunked == recurrent, forward and backward, with every in-kernel option the layers use


GATED_OPTIONS = [
    dict(),
    dict(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True),
    dict(
        use_qk_l2norm_in_kernel=True,
        use_beta_sigmoid_in_kernel=True,
        allow_neg_eigval=True,
        state_v_first=True,
        use_gate_in_kernel=True,
    ),
]


@pytest.mark.parametrize("opts", GATED_OPTIONS, ids=["plain", "l2norm+sigmoid", "gdn-layer"])
@pytest.mark.parametrize("HV", [2, 4], ids=["H=HV", "GVA"])
def test_gated_chunk_equals_recurrent_forward_and_backward(opts, HV):
    B, T, H, K, V = 2, 90, 2, 24, 16
    q, k, v, beta, g, h0 = inputs(B, T, H, K, V, seed=11, HV=HV)
    extra = {}
    if opts.get("use_gate_in_kernel"):
        g = torch.randn(B, T, HV, generator=gen(1))  # raw gate input
        extra = dict(A_log=torch.rand(HV, generator=gen(2)).mul(16).log(), dt_bias=torch.randn(HV, generator=gen(3)))
    if opts.get("use_beta_sigmoid_in_kernel"):
        beta = torch.randn(B, T, HV, generator=gen(4))  # raw beta logits
    if opts.get("state_v_first"):
        h0 = h0.transpose(-1, -2).contiguous()
    leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, g, h0, *extra.values())]
    results = {}
    for form in ("recurrent", "chunk"):
        xs = [x.detach().clone().requires_grad_() for x in leaves]
        q_, k_, v_, b_, g_, h_, *rest = xs
        kw = dict(opts, **dict(zip(extra, rest)), initial_state=h_, output_final_state=True)
        if form == "recurrent":
            o, s = gated_delta_rule_recurrent(q_, k_, v_, g_, beta=b_, **kw)
        else:
            o, s = gated_delta_rule_chunk(q_, k_, v_, g_, b_, **kw)
        (o * torch.randn(o.shape, generator=gen(7))).sum().add(
            (s * torch.randn(s.shape, generator=gen(8))).sum()
        ).backward()
        results[form] = (o, s, [x.grad for x in xs])
    (o_r, s_r, g_r), (o_c, s_c, g_c) = results["recurrent"], results["chunk"]
    assert_rel(o_c, o_r)
    assert_rel(s_c, s_r)
    names = ["q", "k", "v", "beta", "g", "h0", *extra]
    for name, a, b in zip(names, g_c, g_r):
        assert a is not None and b is not None, name
        assert b.abs().max() > 0, f"zero gradient for {name}"
        assert rel_err(a, b) < 1e-4, f"grad {name}: {rel_err(a, b):.2e}"


def test_delta_rule_chunk_equals_recurrent_backward():
    q, k, v, beta, _, h0 = inputs(2, 100, 2, 24, 40, seed=12)
    grads = {}
    for form in (delta_rule_recurrent, delta_rule_chunk):
        xs = [x.clone().requires_grad_() for x in (q, k, v, beta, h0)]
        o, s = form(*xs[:4], initial_state=xs[4], output_final_state=True, use_qk_l2norm_in_kernel=True)
        (o.square().sum() + s.sum()).backward()
        grads[form.__name__] = [x.grad for x in xs]
    for a, b in zip(grads["delta_rule_chunk"], grads["delta_rule_recurrent"]):
        assert b.abs().max() > 0
        assert rel_err(a, b) < 1e-4


def test_gradcheck_float64_multi_chunk():
    # chunk_size 4 on 10 tokens: three chunks, the last one padded
    B, T, H, K, V = 1, 10, 1, 3, 2
    g_ = gen(13)
    q, k, v = (torch.randn(B, T, H, d, generator=g_, dtype=torch.float64) for d in (K, K, V))
    beta = torch.randn(B, T, H, generator=g_, dtype=torch.float64)
    g = torch.randn(B, T, H, generator=g_, dtype=torch.float64)
    h0 = torch.randn(B, H, K, V, generator=g_, dtype=torch.float64)
    A_log, dt_bias = (
        torch.randn(H, dtype=torch.float64, generator=g_),
        torch.randn(H, dtype=torch.float64, generator=g_),
    )
    xs = [x.requires_grad_() for x in (q, k, v, g, beta, h0, A_log, dt_bias)]

    def fn(q, k, v, g, beta, h0, A_log, dt_bias):
        return gated_delta_rule_chunk(
            q,
            k,
            v,
            g,
            beta,
            initial_state=h0,
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
            use_beta_sigmoid_in_kernel=True,
            use_gate_in_kernel=True,
            A_log=A_log,
            dt_bias=dt_bias,
            chunk_size=4,
        )

    assert fn(*xs)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-5)


def test_chunk_fast_enough_for_training_on_cpu():
    B, T, H, D = 16, 256, 4, 32
    q, k, v, beta, g, _ = inputs(B, T, H, D, D, seed=14)
    xs = [x.requires_grad_() for x in (q, k, v, g, beta)]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        o, _ = gated_delta_rule_chunk(*xs, use_qk_l2norm_in_kernel=True)
        o.sum().backward()
        best = min(best, time.perf_counter() - start)
    assert best < 1.0, f"forward+backward took {best:.2f}s"


# ---------------------------------------------------------------------------------------------
# varlen and state hand-off


LENS = [5, 70, 1, 33]


@pytest.mark.parametrize(
    "name", ["delta_rule_recurrent", "delta_rule_chunk", "gated_delta_rule_recurrent", "gated_delta_rule_chunk"]
)
def test_varlen_equals_segments(name):
    fn = getattr(delta_rule, name)
    gated = name.startswith("gated")
    N, H, K, V = len(LENS), 2, 16, 8
    q, k, v, beta, g, _ = inputs(1, sum(LENS), H, K, V, seed=15)
    h0 = torch.randn(N, H, K, V, generator=gen(16))
    cu = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()])

    def call(q, k, v, beta, g, h0, cu_seqlens=None):
        kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens)
        if not gated:
            return fn(q, k, v, beta, **kw)
        return fn(q, k, v, g, beta=beta, **kw)

    o, s = call(q, k, v, beta, g, h0, cu_seqlens=cu)
    assert s.shape == (N, H, K, V)
    for i, (bos, eos) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_i, s_i = call(*(x[:, bos:eos] for x in (q, k, v, beta, g)), h0[i : i + 1])
        assert_rel(o[:, bos:eos], o_i, 1e-5)
        assert_rel(s[i : i + 1], s_i, 1e-5)


def test_chunk_state_feeds_recurrent_decoding():
    """What generate does: chunked prefill, then token-by-token decoding from its state (V-first)."""
    q, k, v, beta, g, _ = inputs(2, 75, 2, 24, 16, seed=17)
    A_log, dt_bias = torch.zeros(2), torch.zeros(2)
    kw = dict(
        use_qk_l2norm_in_kernel=True,
        use_beta_sigmoid_in_kernel=True,
        state_v_first=True,
        use_gate_in_kernel=True,
        A_log=A_log,
        dt_bias=dt_bias,
        output_final_state=True,
    )
    o_full, s_full = gated_delta_rule_chunk(q, k, v, g, beta, **kw)
    o_pre, state = gated_delta_rule_chunk(*(x[:, :70] for x in (q, k, v, g, beta)), **kw)
    assert state.shape == (2, 2, 16, 24)  # [N, HV, V, K]
    outs = [o_pre]
    for t in range(70, 75):
        o_t, state = gated_delta_rule_recurrent(
            *(x[:, t : t + 1] for x in (q, k, v, g)), beta=beta[:, t : t + 1], initial_state=state, **kw
        )
        outs.append(o_t)
    assert_rel(torch.cat(outs, 1), o_full)
    assert_rel(state, s_full)


def test_per_value_beta_in_recurrent_form():
    q, k, v, _, _, h0 = inputs(1, 20, 2, 8, 4, seed=18)
    beta = torch.rand(1, 20, 2, 4, generator=gen(19))
    o, s = delta_rule_recurrent(q, k, v, beta, initial_state=h0, output_final_state=True)
    # per-value beta equal across V == scalar beta
    o2, s2 = delta_rule_recurrent(q, k, v, beta[..., :1].expand_as(beta), initial_state=h0, output_final_state=True)
    o3, s3 = delta_rule_recurrent(q, k, v, beta[..., 0], initial_state=h0, output_final_state=True)
    assert_rel(o2, o3, 1e-6)
    assert rel_err(o, o3) > 1e-3  # and a real per-value beta does differ
    with pytest.raises(ValueError):
        delta_rule_chunk(q, k, v, beta)


# ---------------------------------------------------------------------------------------------
# causal conv


def short_conv(D=12, W=4, bias=True, activation="silu", seed=0):
    from fla.modules import ShortConvolution

    torch.manual_seed(seed)
    layer = ShortConvolution(hidden_size=D, kernel_size=W, bias=bias, activation=activation)
    with torch.no_grad():
        layer.bias.normal_() if bias else None
    return layer


@pytest.mark.parametrize("activation", ["silu", None])
def test_conv_matches_torch_conv1d(activation):
    layer = short_conv(activation=activation)
    x = torch.randn(2, 9, 12, generator=gen(20))
    y, cache = layer(x, output_final_state=True)
    ref = torch.nn.Conv1d.forward(layer, x.transpose(1, 2))[..., :9].transpose(1, 2)  # padding W-1, causal crop
    ref = F.silu(ref) if activation else ref
    assert_rel(y, ref, 1e-6)
    assert torch.equal(cache, x[:, -4:].transpose(1, 2))  # cache = last W inputs, [N, D, W]


def test_conv_prefix_then_decode_equals_one_go():
    layer = short_conv()
    x = torch.randn(3, 11, 12, generator=gen(21))
    with torch.no_grad():
        y_all, cache_all = layer(x, output_final_state=True)
        y_pre, cache = layer(x[:, :2], output_final_state=True)  # prefix shorter than the kernel
        outs = [y_pre]
        for t in range(2, 11):
            cache_before = cache
            y_t, cache = layer(x[:, t : t + 1], cache=cache, output_final_state=True)  # the in-place decode step
            assert cache is cache_before
            outs.append(y_t)
    assert_rel(torch.cat(outs, 1), y_all, 1e-6)
    assert torch.equal(cache, cache_all)


def test_conv_cache_continues_a_sequence_with_grad():
    layer = short_conv()
    x = torch.randn(2, 10, 12, generator=gen(22))
    y_all, _ = layer(x)
    _, cache = layer(x[:, :6], output_final_state=True)
    h0 = cache.detach().requires_grad_()
    y_rest, _ = layer(x[:, 6:], cache=h0)
    assert_rel(y_rest, y_all[:, 6:], 1e-6)
    y_rest.sum().backward()
    assert h0.grad[..., 1:].abs().sum() > 0 and h0.grad[..., 0].abs().sum() == 0  # oldest column unused


def test_conv_varlen_equals_segments():
    layer = short_conv()
    lens = [3, 8, 1]
    x = torch.randn(1, sum(lens), 12, generator=gen(23))
    h0 = torch.randn(3, 12, 4, generator=gen(24))
    cu = torch.tensor([0, 3, 11, 12])
    y, s = conv.causal_conv1d(
        x, layer.weight[:, 0], layer.bias, initial_state=h0, output_final_state=True, activation="silu", cu_seqlens=cu
    )
    for i, (bos, eos) in enumerate([(0, 3), (3, 11), (11, 12)]):
        y_i, s_i = conv.causal_conv1d(
            x[:, bos:eos],
            layer.weight[:, 0],
            layer.bias,
            initial_state=h0[i : i + 1],
            output_final_state=True,
            activation="silu",
        )
        assert_rel(y[:, bos:eos], y_i, 1e-6)
        assert torch.equal(s[i : i + 1], s_i)
    assert torch.equal(s[2, :, :3], h0[2, :, 1:])  # one-token segment: cache shifted by one


def test_conv_decode_step_with_packed_sequences():
    layer = short_conv()
    cache = torch.randn(3, 12, 4, generator=gen(25))
    x = torch.randn(1, 3, 12, generator=gen(26))
    y_dense, s_dense = conv.causal_conv1d(
        x.transpose(0, 1),
        layer.weight[:, 0],
        layer.bias,
        initial_state=cache,
        output_final_state=True,
        activation="silu",
    )
    with torch.no_grad():
        y, s = layer(x, cache=cache.clone(), output_final_state=True, cu_seqlens=torch.tensor([0, 1, 2, 3]))
    assert_rel(y, y_dense.transpose(0, 1), 1e-6)
    assert torch.equal(s, s_dense)


# ---------------------------------------------------------------------------------------------
# norms, swiglu, cross entropy


def test_rms_norm_prenorm_residual_semantics():
    from fla.modules import RMSNorm

    layer = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        layer.weight.normal_()
    x, res = torch.randn(4, 16, generator=gen(27)), torch.randn(4, 16, generator=gen(28))
    ref = torch.nn.functional.rms_norm(x + res, (16,), layer.weight, eps=1e-5)
    y, new_res = layer(x, res, True)
    assert_rel(y, ref, 1e-6)
    assert torch.equal(new_res, x + res)
    assert layer(x, prenorm=True)[1] is x  # no residual: the input is the new residual
    xb = x.bfloat16()
    y16, r32 = layer(xb, prenorm=True, residual_in_fp32=True)
    assert y16.dtype == torch.bfloat16 and r32.dtype == torch.float32
    o_norm = RMSNorm(16, dtype=torch.float32)  # DeltaNet's o_norm: fp32 weight, bf16 input -> bf16 output
    assert o_norm(xb).dtype == torch.bfloat16


@pytest.mark.parametrize("activation", ["swish", "sigmoid"])
def test_fused_rms_norm_gated(activation):
    from fla.modules import FusedRMSNormGated

    layer = FusedRMSNormGated(16, eps=1e-5, activation=activation)
    x, g = torch.randn(2, 3, 4, 16, generator=gen(29)), torch.randn(2, 3, 4, 16, generator=gen(30))
    gate = F.silu(g) if activation == "swish" else torch.sigmoid(g)
    assert_rel(layer(x, g), F.rms_norm(x, (16,), layer.weight, eps=1e-5) * gate, 1e-6)


def test_layer_norm_reference():
    x, w, b = (
        torch.randn(5, 16, generator=gen(31)),
        torch.randn(16, generator=gen(32)),
        torch.randn(16, generator=gen(33)),
    )
    assert_rel(norm.layer_norm(x, w, b, eps=1e-5), F.layer_norm(x, (16,), w, b, eps=1e-5), 1e-6)


def test_swiglu_and_gated_mlp():
    from fla.modules import GatedMLP

    x, y = torch.randn(3, 8, generator=gen(34)), torch.randn(3, 8, generator=gen(35))
    assert_rel(swiglu(x, y), F.silu(x) * y, 1e-7)
    w = torch.randn(5, 8, generator=gen(36))
    assert_rel(swiglu_linear(x, y, w, None), (F.silu(x) * y) @ w.T, 1e-6)
    torch.manual_seed(0)
    fused, plain = GatedMLP(16, fuse_swiglu=True), GatedMLP(16, fuse_swiglu=False)
    plain.load_state_dict(fused.state_dict())
    h = torch.randn(2, 5, 16, generator=gen(37))
    assert_rel(fused(h), plain(h), 1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_cross_entropy_matches_torch(label_smoothing, reduction):
    from fla.modules import FusedCrossEntropyLoss

    logits = torch.randn(12, 30, generator=gen(38), requires_grad=True)
    target = torch.randint(0, 30, (12,), generator=gen(39))
    target[[2, 7]] = -100
    got = FusedCrossEntropyLoss(reduction=reduction, label_smoothing=label_smoothing, inplace_backward=True)(
        logits, target
    )
    ref = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=label_smoothing)
    if reduction == "none":
        ref = torch.where(target == -100, 0.0, ref)  # fla (and torch) give ignored rows 0
    assert_rel(got, ref, 1e-6)
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    assert_rel(g_got, g_ref, 1e-6)
    assert g_got[2].abs().sum() == 0


def test_cross_entropy_z_loss_and_softcap():
    logits = torch.randn(6, 10, generator=gen(40)) * 5
    target = torch.randint(0, 10, (6,), generator=gen(41))
    lossv, z = loss.cross_entropy_loss(logits, target, lse_square_scale=1e-2, logit_softcapping=3.0, logit_scale=2.0)
    x = 3.0 * torch.tanh(2.0 * logits / 3.0)
    lse = x.logsumexp(-1)
    assert_rel(z, 1e-2 * lse**2, 1e-6)
    assert_rel(lossv, F.cross_entropy(x, target, reduction="none") + z, 1e-6)


def test_fused_linear_cross_entropy_matches_torch():
    from fla.modules import FusedLinearCrossEntropyLoss

    x = torch.randn(2, 6, 8, generator=gen(42))
    w = torch.randn(20, 8, generator=gen(43))
    target = torch.randint(0, 20, (2, 6), generator=gen(44))
    target[0, 0] = -100
    got = FusedLinearCrossEntropyLoss()(x, target, w)
    assert_rel(got, F.cross_entropy((x @ w.T).reshape(-1, 20), target.reshape(-1)), 1e-6)


# ---------------------------------------------------------------------------------------------
# whole models


def tiny(family: str, seed: int = 0, **over):
    from fla.models import DeltaNetConfig, GatedDeltaNetConfig
    from transformers import AutoModelForCausalLM

    common = dict(hidden_size=64, num_hidden_layers=2, vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family.startswith("deltanet"):
        cfg = DeltaNetConfig(**{**common, "num_heads": 2, "use_gate": family == "deltanet-gate", **over})
    else:
        cfg = GatedDeltaNetConfig(**{**common, "num_heads": 2, "head_dim": 16, "expand_v": 2.0, **over})
    assert cfg.fuse_norm and cfg.fuse_swiglu and cfg.fuse_cross_entropy  # the fused (Triton) paths
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # a random init is near-degenerate; spread the weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


FAMILIES = ["deltanet", "deltanet-gate", "gated_deltanet"]


def tokens(B, T, seed=0):
    return torch.randint(3, 128, (B, T), generator=gen(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_model_forward_backward(family):
    model = tiny(family).train()
    ids = tokens(2, 80)
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    shifted = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    assert_rel(out.loss, shifted, 1e-5)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.model.layers[0].attn.q_proj.weight.grad.abs().max() > 0
    if family == "gated_deltanet":
        assert model.model.layers[0].attn.A_log.grad.abs().max() > 0


def greedy_by_reforward(model, ids, n):
    logits = []
    for _ in range(n):
        with torch.no_grad():
            step = model(input_ids=ids, use_cache=False).logits[:, -1]
        logits.append(step)
        ids = torch.cat([ids, step.argmax(-1, keepdim=True)], 1)
    return ids, torch.stack(logits, 1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt_len", [20, 70], ids=["recurrent-prefill", "chunk-prefill"])
def test_generate_equals_reforward(family, prompt_len):
    model = tiny(family).eval()
    ids = tokens(1, prompt_len, seed=1)
    out = model.generate(
        ids, max_new_tokens=8, do_sample=False, use_cache=True, return_dict_in_generate=True, output_logits=True
    )
    ref_ids, ref_logits = greedy_by_reforward(model, ids, 8)
    assert torch.equal(out.sequences, ref_ids)
    assert_rel(torch.stack(out.logits, 1), ref_logits, 1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", [(30, 21), (90, 71)], ids=["short", "long"])
def test_left_padded_batch_equals_single_sequences(family, lengths):
    model = tiny(family).eval()
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    singles = []
    for i, n in enumerate(lengths):
        seq = tokens(1, n, seed=10 + i)
        ids[i, T - n :], mask[i, T - n :] = seq[0], 1
        singles.append(seq)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for i, seq in enumerate(singles):
            alone = model(input_ids=seq, use_cache=False).logits
            assert_rel(batched[i, T - seq.shape[1] :], alone[0], 1e-4)


@pytest.mark.parametrize("family", ["deltanet", "gated_deltanet"])
def test_left_padded_batch_generate(family):
    model = tiny(family).eval()
    a, b = tokens(1, 12, seed=3), tokens(1, 9, seed=4)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    for i, seq in enumerate((a, b)):
        single = model.generate(
            seq, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        assert torch.equal(out.sequences[i, -6:], single.sequences[0, -6:])
        assert_rel(torch.stack(out.logits, 1)[i], torch.stack(single.logits, 1)[0], 1e-4)


@pytest.mark.parametrize(
    "family,over,head_k_dim",
    [
        ("deltanet", dict(expand_k=0.75), 24),
        ("deltanet-gate", dict(expand_k=0.25), 8),
        ("gated_deltanet", dict(head_dim=24), 24),
        ("gated_deltanet", dict(head_dim=8, num_v_heads=4, expand_v=4.0), 8),  # with grouped value heads
    ],
)
def test_models_with_shrunk_key_dim(family, over, head_k_dim):
    model = tiny(family, **over)
    attn = model.model.layers[0].attn
    assert attn.head_k_dim == head_k_dim
    ids = tokens(2, 70, seed=5)
    out = model.train()(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and attn.q_proj.weight.grad.abs().max() > 0
    model.eval()
    gen_out = model.generate(ids[:1, :66], max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    state = gen_out.past_key_values[0]["recurrent_state"]
    hv = getattr(attn, "num_v_heads", attn.num_heads)
    assert head_k_dim in state.shape[-2:] and state.shape[1] == hv
    ref_ids, _ = greedy_by_reforward(model, ids[:1, :66], 4)
    assert torch.equal(gen_out.sequences, ref_ids)


def test_deltanet_fused_recurrent_mode_trains():
    model = tiny("deltanet", attn_mode="fused_recurrent").train()
    ids = tokens(2, 80, seed=6)
    chunk = tiny("deltanet").train()
    out_r, out_c = model(input_ids=ids, labels=ids), chunk(input_ids=ids, labels=ids)
    assert_rel(out_r.logits, out_c.logits, 1e-4)  # same weights, the other kernel
    out_r.loss.backward()
    assert model.model.layers[1].attn.k_proj.weight.grad.abs().max() > 0


# ---------------------------------------------------------------------------------------------
# the switch


def test_install_is_idempotent_and_covers_the_layers():
    import fla.layers.delta_net as dn
    import fla.layers.gated_deltanet as gdn
    import fla.modules.mlp as mlp
    from fla.modules import FusedCrossEntropyLoss
    from fla.modules.causal_conv1d import ops as conv_ops
    from fla.modules.norm import fused_norm_gate, layernorm

    before = fla_cpu.patches()
    wrapper = dn.chunk_delta_rule
    fla_cpu.install()
    fla_cpu.install()
    assert fla_cpu.installed()
    assert fla_cpu.patches() == before
    assert dn.chunk_delta_rule is wrapper
    assert not hasattr(wrapper._harness_original, "_harness_reference")  # never wrapped twice
    expected = {
        dn.chunk_delta_rule: delta_rule.delta_rule_chunk,
        dn.fused_recurrent_delta_rule: delta_rule.delta_rule_recurrent,
        gdn.chunk_gated_delta_rule: delta_rule.gated_delta_rule_chunk,
        gdn.fused_recurrent_gated_delta_rule: delta_rule.gated_delta_rule_recurrent,
        gdn.causal_conv1d: conv.causal_conv1d,
        conv_ops.causal_conv1d: conv.causal_conv1d,
        conv_ops.causal_conv1d_update: conv.causal_conv1d_update,
        layernorm.rms_norm: norm.rms_norm,
        fused_norm_gate.rms_norm_gated: norm.rms_norm_gated,
        mlp.swiglu: swiglu,
        mlp.swiglu_linear: swiglu_linear,
        FusedCrossEntropyLoss.forward: loss.fused_cross_entropy_forward,
    }
    for patched, reference in expected.items():
        assert patched._harness_reference is reference


def test_uninstall_restores_fla_and_install_again():
    import fla.layers.delta_net as dn

    wrapper = dn.chunk_delta_rule
    try:
        fla_cpu.uninstall()
        assert not fla_cpu.installed()
        assert dn.chunk_delta_rule is wrapper._harness_original
    finally:
        fla_cpu.install()
    assert fla_cpu.installed() and dn.chunk_delta_rule._harness_original is wrapper._harness_original


def test_routing_decision():
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    assert fla_cpu.wants_reference_device(torch.device("cpu"))
    assert not fla_cpu.wants_reference_device(torch.device("cuda", 0))
    assert not fla_cpu.wants_reference_device("xpu")
    assert fla_cpu.use_reference((cpu, cpu), {"beta": cpu, "scale": 0.5})
    assert not fla_cpu.use_reference((meta, meta), {})
    assert not fla_cpu.use_reference((cpu,), {"q": meta})  # one tensor elsewhere -> fla
    assert not fla_cpu.use_reference((meta,), {"cu_seqlens_cpu": cpu})
    assert not fla_cpu.use_reference((1, "x"), {})  # no tensors -> fla
    assert not fla_cpu.use_reference(([cpu, meta],), {})  # tensors inside a tuple/list count

    calls = []
    wrapper = fla_cpu._route(lambda *a, **k: calls.append("fla"), lambda *a, **k: calls.append("ref"), "f")
    wrapper(cpu, x=cpu)
    wrapper(meta, x=meta)
    wrapper(cpu, x=meta)
    assert calls == ["ref", "fla", "fla"]


@pytest.mark.parametrize(
    "attr",
    ["chunk_delta_rule", "fused_recurrent_delta_rule", "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"],
)
def test_reference_signatures_match_fla(attr):
    """Positional calls must line up: every fla parameter, in fla's order, exists in the reference."""
    import fla.ops

    wrapper = getattr(fla.ops, attr)
    original = inspect.unwrap(wrapper._harness_original)
    fla_params = [p for p in inspect.signature(original).parameters.values() if p.kind != p.VAR_KEYWORD]
    ref_params = [
        p for p in inspect.signature(wrapper._harness_reference).parameters.values() if p.kind != p.VAR_KEYWORD
    ]
    assert [p.name for p in ref_params] == [p.name for p in fla_params]
    assert [p.default for p in ref_params] == [p.default for p in fla_params]
