"""transformers' Gated DeltaNet decode ops on our kernels (kernels/hf_gdn_decode.py), and the static
loop's hybrid step running them (harness/decode_state.py, HybridState.step).

CPU (CI): the conv step against transformers' own torch update, the recurrent step against
transformers' token loop (our kernel's torch twin, `fla_decode.KERNEL_DEVICES` widened to "cpu"),
the backend switch, and a tiny hybrid of each kind decoded by the loop through both ops (counted)
with the same tokens as `generate`. GPU (skipped without CUDA): the same two ops on our Triton conv
step (kernels/conv_decode.py) and delta-rule step against transformers' torch references.
"""

from __future__ import annotations

import sys

import pytest
import torch

from harness.families.hf_linear import gdn_layers
from harness.kernels import fla_cpu, fla_decode, hf_gdn_decode
from test_graph_decode import HYBRIDS, both, hybrid
from test_kcache import padded_batch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module", autouse=True)
def _installed():
    fla_cpu.install()


def transformers_ops():
    """transformers' torch conv update and token-loop delta rule (the fallbacks its wrappers hold)."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m

    def torch_function(wrapper):
        return dict(zip(wrapper.__code__.co_freevars, wrapper.__closure__))["torch_function"].cell_contents

    return torch_function(m.causal_conv1d_update), torch_function(m.torch_recurrent_gated_delta_rule)


def conv_case(device, dtype, batch=3, channels=40, width=4, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, 1, generator=g).to(device, dtype)
    state = torch.randn(batch, channels, width, generator=g).to(device, dtype)
    weight = torch.randn(channels, width, generator=g).to(device, dtype)
    b = torch.randn(channels, generator=g).to(device, dtype) if bias else None
    return x, state, weight, b


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_step_is_transformers_update(bias, activation):
    reference, _ = transformers_ops()
    x, state, weight, b = conv_case("cpu", torch.float32, bias=bias)
    theirs = state.clone()
    expected = reference(x, theirs, weight, b, activation)
    out = hf_gdn_decode.causal_conv1d_update(x, state, weight, b, activation)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state, theirs, atol=0, rtol=0)  # the same shift, in place


def test_conv_step_refuses_more_than_one_token():
    x, state, weight, b = conv_case("cpu", torch.float32)
    with pytest.raises(ValueError, match="one token a row"):
        hf_gdn_decode.causal_conv1d_update(torch.cat([x, x], -1), state, weight, b)


def recurrent_case(device, dtype, batch=3, heads=2, value_heads=4, dk=16, dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, 1, heads, dk, generator=g).to(device, dtype) for _ in range(2))
    v = torch.randn(batch, 1, value_heads, dv, generator=g).to(device, dtype)
    gate = (-torch.rand(batch, 1, value_heads, generator=g) * 0.5).to(device)  # float32, as the layers pass it
    beta = (2 * torch.rand(batch, 1, value_heads, generator=g)).to(device, dtype)  # up to 2: OLMo-hybrid's range
    state = torch.randn(batch, value_heads, dk, dv, generator=g).to(device)
    return q, k, v, gate, beta, state


def run_recurrent(op, case):
    q, k, v, gate, beta, state = case
    return op(q, k, v, g=gate, beta=beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)


def test_recurrent_step_is_transformers_loop_and_updates_the_state_in_place(monkeypatch):
    monkeypatch.setattr(fla_decode, "KERNEL_DEVICES", ("cpu",))  # the kernel's torch twin on CPU tensors
    monkeypatch.delenv(fla_decode.ENV, raising=False)
    _, reference = transformers_ops()
    case = recurrent_case("cpu", torch.float32)
    expected_o, expected_state = run_recurrent(reference, (*case[:5], case[5].clone()))
    ours = hf_gdn_decode.recurrent_gated_delta_rule(pytest.fail)  # never the original here
    o, state = run_recurrent(ours, case)
    assert state is case[5]  # updated in place and handed back
    torch.testing.assert_close(o, expected_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, expected_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("why", ["backend", "device", "tokens"])
def test_refused_recurrent_calls_run_the_original(monkeypatch, why):
    monkeypatch.delenv(fla_decode.ENV, raising=False)
    monkeypatch.setattr(fla_decode, "KERNEL_DEVICES", ("cpu",))
    case = list(recurrent_case("cpu", torch.float32))
    if why == "backend":
        monkeypatch.setenv(fla_decode.ENV, "fla")
    elif why == "device":
        monkeypatch.setattr(fla_decode, "KERNEL_DEVICES", ("cuda",))
    else:
        case[:3] = [torch.cat([t, t], 1) for t in case[:3]]
        case[3:5] = [torch.cat([t, t], 1) for t in case[3:5]]
    calls = []
    ours = hf_gdn_decode.recurrent_gated_delta_rule(lambda *a, **kw: calls.append(kw) or "original")
    assert run_recurrent(ours, case) == "original"
    assert calls and calls[0]["use_qk_l2norm_in_kernel"] is True


@pytest.fixture
def counted_steps(monkeypatch):
    """Calls of our delta-rule step and of our conv step while the test runs (CPU: their torch twins)."""
    calls = {"delta_rule": 0, "conv": 0, "gates in the kernel": 0}
    step, conv = fla_decode.delta_rule_step, hf_gdn_decode.conv_step

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            if kwargs.get("A_log") is not None and kwargs.get("beta_sigmoid"):
                calls["gates in the kernel"] += 1
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(fla_decode, "KERNEL_DEVICES", ("cpu",))
    monkeypatch.delenv(fla_decode.ENV, raising=False)
    monkeypatch.setattr(fla_decode, "delta_rule_step", counted("delta_rule", step))
    monkeypatch.setattr(hf_gdn_decode, "conv_step", counted("conv", conv))
    return calls


@pytest.mark.parametrize("model_type, compressed", HYBRIDS)
def test_hybrid_loop_steps_through_our_ops(counted_steps, model_type, compressed):
    """Each decode step of the loop runs our conv and delta-rule steps once per linear layer (3
    here), and the loop still decodes what `generate` does. Layers of Qwen3.5's layout step
    through `fused_step`: the decay and beta's sigmoid in the kernel."""
    model = hybrid(compressed, model_type)
    ids, mask = padded_batch(vocab=128)
    new = 6
    (seq, scores), (seq2, scores2) = both(model, ids, mask, new=new)
    assert torch.equal(seq2, seq)
    torch.testing.assert_close(scores2, scores, atol=2e-5, rtol=1e-5)
    steps = new - 1  # the first new token comes from the prefill's logits
    fused = 3 * steps if model_type.startswith("qwen3_5") else 0
    assert counted_steps == {"delta_rule": 3 * steps, "conv": 3 * steps, "gates in the kernel": fused}
    module = sys.modules[type(gdn_layers(model)[0][1]).__module__]
    assert all("forward" not in attn.__dict__ for _, attn in gdn_layers(model))  # the layers' own forward again
    assert module.causal_conv1d_update is not hf_gdn_decode.causal_conv1d_update  # restored after the steps
    assert module.torch_recurrent_gated_delta_rule.__module__ == module.__name__


def test_fused_step_takes_transformers_ops_where_our_kernel_is_refused(counted_steps, monkeypatch):
    """With fla's backend asked for, a Qwen3.5 layer's own step computes the gates and runs
    transformers' delta rule (none of ours), and the loop still decodes what `generate` does."""
    monkeypatch.setenv(fla_decode.ENV, "fla")
    model = hybrid(True, "qwen3_5_text")
    ids, mask = padded_batch(vocab=128)
    (seq, scores), (seq2, scores2) = both(model, ids, mask, new=5)
    assert torch.equal(seq2, seq)
    torch.testing.assert_close(scores2, scores, atol=2e-5, rtol=1e-5)
    assert counted_steps == {"delta_rule": 0, "conv": 3 * 4, "gates in the kernel": 0}


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_conv_step_on_cuda_is_transformers_update(dtype):
    reference, _ = transformers_ops()
    x, state, weight, b = conv_case("cuda", dtype, batch=64, channels=6144)
    theirs = state.clone()
    expected = reference(x, theirs, weight, b, "silu")
    out = hf_gdn_decode.causal_conv1d_update(x, state, weight, b, "silu")
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    torch.testing.assert_close(state, theirs, atol=0, rtol=0)


@pytest.mark.gpu
@CUDA
def test_recurrent_step_on_cuda_is_transformers_loop(monkeypatch):
    monkeypatch.delenv(fla_decode.ENV, raising=False)
    _, reference = transformers_ops()
    case = recurrent_case("cuda", torch.bfloat16, batch=64, heads=16, value_heads=32, dk=128, dv=128)
    expected_o, expected_state = run_recurrent(reference, (*case[:5], case[5].clone()))
    o, state = run_recurrent(hf_gdn_decode.recurrent_gated_delta_rule(pytest.fail), case)
    assert state is case[5]
    torch.testing.assert_close(o.float(), expected_o.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(state, expected_state, atol=1e-4, rtol=1e-4)
