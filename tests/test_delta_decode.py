"""The one-token delta-rule decode step (kernels/delta_decode.py): its torch twin against the
token-loop references of fla's ops, the Triton kernel against the twin under Triton's CPU
interpreter (a subprocess, so the interpreter switch touches no other test) and on CUDA."""

from __future__ import annotations

import textwrap

import pytest
import torch

from harness.kernels import delta_rule
from harness.kernels.delta_decode import delta_rule_step, delta_rule_step_reference
from triton_interpreter import max_difference


def inputs(b=3, h=2, dk=24, dv=16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, dk, generator=g) for _ in range(2))
    v = torch.randn(b, h, dv, generator=g)
    beta, gate = torch.rand(b, h, generator=g), -torch.rand(b, h, generator=g)
    state = torch.randn(b, h, dk, dv, generator=g)
    return [x.to(device) for x in (q, k, v, beta, gate, state)]


@pytest.mark.parametrize("gated", [False, True])
def test_reference_step_equals_the_token_loop_reference(gated):
    q, k, v, beta, gate, state = inputs()
    expected_state = state.clone()
    # the token-loop references take (B, T, H, d) with T = 1 and return the final state
    args = dict(
        q=q[:, None],
        k=k[:, None],
        v=v[:, None],
        beta=beta[:, None],
        initial_state=expected_state,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )
    if gated:
        o, final = delta_rule.gated_delta_rule_recurrent(g=gate[:, None], **args)
    else:
        o, final = delta_rule.delta_rule_recurrent(**args)
    ours = delta_rule_step_reference(q, k, v, beta, state, gate if gated else None)
    torch.testing.assert_close(ours, o[:, 0].float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, final.float(), atol=1e-5, rtol=1e-5)  # updated in place


INTERPRETED = textwrap.dedent("""
    import torch
    from harness.kernels import launch_settings
    from harness.kernels.delta_decode import KERNEL, delta_rule_step, delta_rule_step_reference
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for dk, dv, gated, evict in ((32, 16, False, 0), (24, 16, True, 1), (8, 40, True, 0), (8, 40, False, 1)):
        launch_settings.OVERRIDE[KERNEL] = {"EVICT_FIRST": evict}
        q, k = torch.randn(2, 3, dk, generator=g), torch.randn(2, 3, dk, generator=g)
        v, beta = torch.randn(2, 3, dv, generator=g), torch.rand(2, 3, generator=g)
        gate, state = -torch.rand(2, 3, generator=g), torch.randn(2, 3, dk, dv, generator=g)
        ref_state = state.clone()
        o = delta_rule_step(q, k, v, beta, state, gate if gated else None, block_v=16)
        r = delta_rule_step_reference(q, k, v, beta, ref_state, gate if gated else None)
        worst = max(worst, (o - r).abs().max().item(), (state - ref_state).abs().max().item())
    # rows read in place: q, k, v, beta and the raw gate as column slices of one wide projection
    # (the Qwen3.5 layer's decode step), the gate and beta's sigmoid computed in the kernel
    launch_settings.OVERRIDE.pop(KERNEL)
    h, hv, dk, dv = 2, 4, 16, 8
    wide = torch.randn(3, 2 * h * dk + hv * dv + 2 * hv + 5, generator=g)
    q, k, v, b, a = wide[:, :-5].split([h * dk, h * dk, hv * dv, hv, hv], -1)
    q, k, v = q.view(3, h, dk), k.view(3, h, dk), v.view(3, hv, dv)
    assert not q.is_contiguous() and not b.is_contiguous()
    A_log, dt_bias = torch.randn(hv, generator=g), torch.randn(hv, generator=g)
    state = torch.randn(3, hv, dk, dv, generator=g)
    ref_state = state.clone()
    fused = dict(A_log=A_log, dt_bias=dt_bias, beta_sigmoid=True)
    o = delta_rule_step(q, k, v, b, state, a, block_v=8, **fused)
    r = delta_rule_step_reference(q, k, v, b, ref_state, a, **fused)
    worst = max(worst, (o - r).abs().max().item(), (state - ref_state).abs().max().item())
    print("max difference", worst)
""")


def test_triton_kernel_under_the_cpu_interpreter():
    assert max_difference(INTERPRETED) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dk", [128, 96, 64, 32])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("evict", [0, 1])
def test_triton_kernel_on_cuda_equals_the_twin_and_fla(dk, gated, evict, monkeypatch):
    from harness.kernels import launch_settings
    from harness.kernels.delta_decode import KERNEL

    monkeypatch.setitem(launch_settings.OVERRIDE, KERNEL, {"EVICT_FIRST": evict})
    q, k, v, beta, gate, state = inputs(b=64, h=16, dk=dk, dv=128, device="cuda")
    v = v.bfloat16()
    ref_state = state.clone()
    o = delta_rule_step(q.bfloat16(), k.bfloat16(), v, beta, state, gate if gated else None)
    r = delta_rule_step_reference(q.bfloat16(), k.bfloat16(), v, beta, ref_state, gate if gated else None)
    torch.testing.assert_close(o.float(), r.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(state, ref_state, atol=1e-4, rtol=1e-4)
    # and fla's own decode op gives the same step
    from fla.ops.delta_rule import fused_recurrent_delta_rule
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    fla_state = inputs(b=64, h=16, dk=dk, dv=128, device="cuda")[-1]
    args = dict(
        q=q.bfloat16()[:, None],
        k=k.bfloat16()[:, None],
        v=v[:, None],
        beta=beta.bfloat16()[:, None],
        initial_state=fla_state,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )
    if gated:
        fo, fs = fused_recurrent_gated_delta_rule(g=gate[:, None], **args)
    else:
        fo, fs = fused_recurrent_delta_rule(**args)
    torch.testing.assert_close(o.float(), fo[:, 0].float(), atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(state, fs.float(), atol=2e-2, rtol=2e-2)
