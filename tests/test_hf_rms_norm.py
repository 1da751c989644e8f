"""transformers' RMSNorm modules in one launch (kernels/hf_rms_norm.py), and the hybrid decode step's
swap of them (harness/decode_state.py, `fused_norms`).

CPU (CI): the torch twin against every module class it covers, in float32 and bfloat16; the Triton
kernel under Triton's CPU interpreter against the twin; the swap and its undoing. GPU (skipped
without CUDA): the kernel against the modules."""

from __future__ import annotations

import importlib
import textwrap

import pytest
import torch

from harness.decode_state import fused_norms
from harness.kernels.hf_rms_norm import CONVENTIONS, fused_forward, rms_norm_rows, rms_norm_rows_reference
from triton_interpreter import max_difference

MODULES = ("qwen3_5", "qwen3_5_moe", "qwen3_next", "olmo_hybrid", "llama", "qwen2")


def norm_class(name: str):
    for short in MODULES:
        found = getattr(importlib.import_module(f"transformers.models.{short}.modeling_{short}"), name, None)
        if found is not None:
            return found
    raise LookupError(name)


def module_and_inputs(name: str, dtype, device="cpu", rows=6, width=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    module = norm_class(name)(width, eps=1e-6)
    with torch.no_grad():
        module.weight.copy_(torch.randn(width, generator=g) * 0.5 + (0 if CONVENTIONS[name]["offset"] else 1))
    x = (torch.randn(rows, width, generator=g) * 3).to(device, dtype)
    gate = torch.randn(rows, width, generator=g).to(device, dtype) if CONVENTIONS[name].get("gated") else None
    return module.to(device, dtype), x, gate


def call(module, x, gate):
    return module(x, gate) if gate is not None else module(x)


def ours_and_theirs(norm, name: str, dtype, device="cpu", **shape):
    """`norm` (the kernel or its twin) and the module of class `name` on the same rows."""
    module, x, gate = module_and_inputs(name, dtype, device, **shape)
    convention = CONVENTIONS[name]
    eps = getattr(module, "variance_epsilon", None) or module.eps
    ours = norm(x, module.weight, eps, offset=convention["offset"], cast_first=convention["cast_first"], gate=gate)
    with torch.no_grad():
        return ours, call(module, x, gate)


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_twin_is_the_module(name, dtype):
    ours, theirs = ours_and_theirs(rms_norm_rows_reference, name, dtype)
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6 if dtype == torch.float32 else 0)


def test_fused_forward_takes_only_known_modules_of_the_input_dtype():
    assert fused_forward(torch.nn.LayerNorm(8)) is None
    module, x, _ = module_and_inputs("LlamaRMSNorm", torch.float32)
    forward = fused_forward(module)
    torch.testing.assert_close(forward(x), module(x))
    with torch.no_grad():  # a float32 weight on bfloat16 rows: the module's own forward (its promotion rules)
        torch.testing.assert_close(forward(x.bfloat16()), module(x.bfloat16()))


def test_fused_norms_swaps_every_norm_and_undoes_it():
    from test_hybrid import tiny_hybrid

    model = tiny_hybrid("qwen3_5_text")
    norms = [m for m in model.modules() if type(m).__name__ in CONVENTIONS]
    assert len(norms) == 4 * 2 + 3 + 2 + 1  # per layer 2, a gated one per linear layer, q/k norms, the final
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
        with fused_norms(model):
            assert all("forward" in vars(m) for m in norms)
            got = model(ids).logits
    assert not any("forward" in vars(m) for m in norms)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


INTERPRETED = textwrap.dedent("""
    import torch
    from harness.kernels.hf_rms_norm import rms_norm_rows, rms_norm_rows_reference
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for width, offset, cast_first, gated in ((48, 1.0, False, False), (32, 0.0, True, True), (20, 0.0, True, False)):
        x = torch.randn(5, width, generator=g) * 3
        w = torch.randn(width, generator=g)
        gate = torch.randn(5, width, generator=g) if gated else None
        options = dict(offset=offset, cast_first=cast_first, gate=gate)
        y = rms_norm_rows(x, w, 1e-6, **options)
        r = rms_norm_rows_reference(x, w, 1e-6, **options)
        worst = max(worst, (y - r).abs().max().item())
    print("max difference", worst)
""")


def test_triton_kernel_under_the_cpu_interpreter():
    assert max_difference(INTERPRETED) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(CONVENTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_cuda_is_the_module(name, dtype):
    ours, theirs = ours_and_theirs(rms_norm_rows, name, dtype, "cuda", rows=64 * 16, width=1024)
    # float32: reduction order only; bfloat16: at most one rounding step of the output apart
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(ours, theirs, **tol)
