"""The one-token conv step (kernels/conv_decode.py): the Triton kernel against its torch twin under
Triton's CPU interpreter, the twin against transformers' torch update, which calls fla's route
hands over (fla_decode.KERNEL_DEVICES widened to "cpu" to run the twin there), and on CUDA (skipped
without one) the kernel against fla's own Triton update and inside a DeltaNet layer's decode.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from harness.kernels import conv_decode, fla_cpu, fla_decode
from test_hf_gdn_decode import conv_case, transformers_ops
from triton_interpreter import max_difference

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module", autouse=True)
def _installed():
    fla_cpu.install()


@pytest.fixture
def calls(monkeypatch):
    """Counts conv_step's calls through the fla route, with the twin allowed on CPU tensors."""
    seen = []
    real = conv_decode.conv_step

    def counted(*args, **kwargs):
        seen.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(conv_decode, "conv_step", counted)
    monkeypatch.setattr(fla_decode, "KERNEL_DEVICES", ("cpu",))
    monkeypatch.delenv(fla_decode.ENV, raising=False)
    return seen


def test_twin_is_transformers_update():
    reference, _ = transformers_ops()
    x, state, weight, b = conv_case("cpu", torch.float32)
    theirs = state.clone()
    expected = reference(x, theirs, weight, b, "silu")
    y = conv_decode.conv_step(x[..., 0], state, weight, b, "silu")
    torch.testing.assert_close(y, expected[..., 0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state, theirs, atol=0, rtol=0)


@pytest.mark.parametrize("shape", ["rows", "1-n-d", "n-1-d", "heads"])
def test_fla_route_takes_each_one_token_layout(shape, calls):
    g = torch.Generator().manual_seed(1)
    n, d, w = 3, 12, 4
    x = {"rows": (n, d), "1-n-d": (1, n, d), "n-1-d": (n, 1, d), "heads": (n, 1, 3, 4)}[shape]
    x = torch.randn(*x, generator=g)
    cache, weight, bias = torch.randn(n, d, w, generator=g), torch.randn(d, w, generator=g), torch.randn(d, generator=g)
    theirs = cache.clone()
    expected, _ = conv_decode.conv_step_reference(x, theirs, weight=weight, bias=bias, activation="silu")
    y, returned = conv_decode.causal_conv1d_update_decode(None, x, cache, weight=weight, bias=bias, activation="silu")
    assert calls == [(n, d)] and returned is cache and y.shape == x.shape
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cache, theirs, atol=0, rtol=0)


def test_residual_is_added_after_the_activation(calls):
    g = torch.Generator().manual_seed(2)
    x, residual = torch.randn(2, 1, 8, generator=g), torch.randn(2, 1, 8, generator=g)
    cache, weight = torch.randn(2, 8, 3, generator=g), torch.randn(8, 3, generator=g)
    expected, _ = conv_decode.conv_step_reference(x, cache.clone(), residual, weight, activation="silu")
    y, _ = conv_decode.causal_conv1d_update_decode(None, x, cache, residual, weight, None, "silu")
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)


def refused_calls():
    g = torch.Generator().manual_seed(3)
    x, cache, weight = (
        torch.randn(2, 1, 8, generator=g),
        torch.randn(2, 8, 4, generator=g),
        torch.randn(8, 4, generator=g),
    )
    wide = torch.randn(2, 8, 8, generator=g)
    return {
        "no weight": dict(x=x, cache=cache),
        "no cache": dict(x=x, cache=None, weight=weight),
        "two tokens": dict(x=torch.randn(2, 2, 8), cache=cache, weight=weight),
        "strided cache": dict(x=x, cache=wide[..., ::2], weight=weight),
        "wrong rows": dict(x=x, cache=cache[:1], weight=weight),
        "gradient": dict(x=x.clone().requires_grad_(), cache=cache, weight=weight),
        "activation": dict(x=x, cache=cache, weight=weight, activation="gelu"),
    }


@pytest.mark.parametrize("case", sorted(refused_calls()))
def test_refused_calls_go_to_the_original(case, calls):
    args = refused_calls()[case]
    assert conv_decode.refusal(**args) is not None
    original = lambda **kw: ("original", kw["cache"])  # noqa: E731
    assert conv_decode.causal_conv1d_update_decode(original, **args)[0] == "original"
    assert calls == []


def test_cpu_tensors_are_refused_by_default_and_the_switch_forces_fla(monkeypatch):
    args = refused_calls()["no weight"] | dict(weight=torch.randn(8, 4))
    assert "the kernel runs on cuda" in conv_decode.refusal(**args)
    monkeypatch.setattr(fla_decode, "KERNEL_DEVICES", ("cpu",))
    assert conv_decode.refusal(**args) is None
    monkeypatch.setenv(fla_decode.ENV, "fla")
    original = lambda **kw: ("original", kw["cache"])  # noqa: E731
    assert conv_decode.causal_conv1d_update_decode(original, **args)[0] == "original"


def test_fla_install_routes_the_update_through_the_decode_path():
    from fla.modules.causal_conv1d import ops

    assert ops.causal_conv1d_update._harness_original is not None
    assert "fla.modules.causal_conv1d.ops.causal_conv1d_update" in fla_cpu.patches()


def test_bad_shapes_are_a_clear_error():
    x, state, weight, b = conv_case("cpu", torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        conv_decode.conv_step(x[..., 0], state[:, :-1], weight, b)
    with pytest.raises(ValueError, match="activation"):
        conv_decode.conv_step(x[..., 0], state, weight, b, "relu")


INTERPRETED = textwrap.dedent("""
    import torch
    from harness.kernels.conv_decode import BLOCK_D, conv_step, conv_step_reference
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    # channel counts around the block size, widths 4 and 3, a strided x, bias and residual on and off
    for n, d, w, bias, residual, act in ((3, BLOCK_D + 44, 4, True, False, "silu"), (2, 40, 3, False, True, None),
                                         (1, 2 * BLOCK_D, 4, True, True, "swish")):
        x = torch.randn(n, 2 * d, generator=g)[:, ::2]
        cache = torch.randn(n, d, w, generator=g)
        weight = torch.randn(d, w, generator=g)
        b = torch.randn(d, generator=g) if bias else None
        r = torch.randn(n, d, generator=g) if residual else None
        twin_cache = cache.clone()
        y = conv_step(x, cache, weight, b, act, r)
        y_ref, _ = conv_step_reference(x, twin_cache, residual=r, weight=weight, bias=b, activation=act)
        worst = max(worst, (y - y_ref).abs().max().item(), (cache - twin_cache).abs().max().item())
    print("max difference", worst)
""")


def test_triton_kernel_under_the_cpu_interpreter():
    assert max_difference(INTERPRETED) < 1e-5


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [1024, 2048, 300])
def test_kernel_on_cuda_is_fla_update(dtype, channels):
    from fla.modules.causal_conv1d.ops import causal_conv1d_update

    fla_update = getattr(causal_conv1d_update, "_harness_original", causal_conv1d_update)
    x, state, weight, b = conv_case("cuda", dtype, batch=64, channels=channels)
    theirs = state.clone()
    expected, _ = fla_update(x.transpose(1, 2), theirs, weight=weight, bias=b, activation="silu")
    y = conv_decode.conv_step(x[..., 0], state, weight, b, "silu")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(y, expected[:, 0], **tol)
    torch.testing.assert_close(state, theirs, atol=0, rtol=0)  # the shift is exact


@pytest.mark.gpu
@CUDA
def test_deltanet_layer_decodes_through_our_conv(monkeypatch):
    from test_fla_decode import tiny_model

    seen = []
    real = conv_decode.conv_step
    monkeypatch.setattr(conv_decode, "conv_step", lambda *a, **k: seen.append(1) or real(*a, **k))
    monkeypatch.delenv(fla_decode.ENV, raising=False)
    model = tiny_model("deltanet", device="cuda")
    prompt = torch.randint(3, 500, (2, 6), device="cuda")
    with torch.no_grad():
        ours = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert seen  # the q/k/v convs of every decode step took our kernel
        monkeypatch.setenv(fla_decode.ENV, "fla")
        theirs = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
