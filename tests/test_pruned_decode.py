"""Decode attention over the pruned K cache (kernels/pruned_decode.py) equals the reference
`pruned_cache_attention` for one-token decode: the torch twin on CPU, the Triton kernel under the
Triton CPU interpreter (in a subprocess, so TRITON_INTERPRET=1 reaches no other test), and the
Triton kernel on CUDA at realistic shapes (skipped without a GPU).

Run as a script (`TRITON_INTERPRET=1 python tests/test_pruned_decode.py`) it checks the Triton
path on CPU tensors and exits 0 when every case agrees: that is what the interpreter test runs."""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from triton_interpreter import run_script, unavailable

from harness.kcache import KeyChannelPlan, PrunedKLayer
from harness.kernels.pruned_attention import pruned_cache_attention
from harness.kernels.pruned_decode import pruned_decode_attention, pruned_decode_attention_torch

PADS = (0, 4, 7)


def decode_steps(
    *,
    hq,
    hkv,
    d,
    dv,
    kept,
    prompt,
    steps,
    sink=3,
    recent=5,
    value_sum=True,
    pads=PADS,
    dtype=torch.float32,
    device="cpu",
    chosen=None,
    float_mask=False,
    seed=0,
):
    """Fill a PrunedKLayer with a left-padded prompt, then decode `steps` tokens one at a time.
    Yields (query (B, Hq, 1, d), layer after its update, 4D mask) at each decode step.
    `kept`: per KV head channel tuples (a static plan), or None with `chosen` (B, Hkv, c) per row."""
    g = torch.Generator().manual_seed(seed)
    b, total = len(pads), prompt + steps
    k = torch.randn(b, hkv, total, d, generator=g).to(device, dtype)
    v = torch.randn(b, hkv, total, dv, generator=g).to(device, dtype)
    q = torch.randn(b, hq, total, d, generator=g).to(device, dtype)
    pads_t = torch.tensor(pads)
    plan = KeyChannelPlan(
        hkv, d, dv, kept, sink=sink, recent=recent, value_sum=value_sum, count=0 if chosen is None else chosen.shape[-1]
    )
    layer = PrunedKLayer(plan)
    layer.update(k[:, :, :prompt], v[:, :, :prompt])
    layer.start(pads_t, None if chosen is None else chosen.to(device))
    layer.compact()
    for t in range(prompt, total):
        layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        attends = (torch.arange(t + 1)[None, :] >= pads_t[:, None]).to(device)  # (B, T)
        mask = attends[:, None, None, :]
        if float_mask:
            mask = torch.zeros(mask.shape, device=device).masked_fill(~mask, -1e30)
        yield q[:, :, t : t + 1], layer, mask
        layer.compact()


# per-KV-head kept channels (d = 16): all channels, none, and partial counts, in several groupings
FULL, NONE = tuple(range(16)), ()
CASES = {
    "gqa4x2-full-none": dict(hq=4, hkv=2, d=16, dv=12, kept=(FULL, NONE)),
    "gqa4x2-partial": dict(hq=4, hkv=2, d=16, dv=12, kept=((1, 4, 9), (0, 2, 3, 5, 8, 13, 15))),
    "gqa8x2-none-partial": dict(hq=8, hkv=2, d=16, dv=24, kept=(NONE, (3, 6, 7, 10, 11))),
    "gqa8x4-mixed": dict(hq=8, hkv=4, d=16, dv=16, kept=(FULL, NONE, (0, 5, 7), (2, 3, 11))),
    # six kept counts: more groups than one launch of the Triton path takes (GROUPS_PER_LAUNCH)
    "gqa12x6-six-groups": dict(hq=12, hkv=6, d=16, dv=8, kept=((4,), (1, 2), NONE, (0, 3, 9), FULL, (5, 6, 7, 8, 10))),
}


def compare(cases, fn, *, atol, rtol, **kw):
    """Run `fn` and the reference at every decode step; return the number of steps compared."""
    n = 0
    for query, layer, mask in decode_steps(**cases, **kw):
        ref = pruned_cache_attention(query, layer, mask, scaling=0.3)
        out = fn(query, layer, mask, scaling=0.3)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        torch.testing.assert_close(
            out.float(),
            ref.float(),
            atol=atol,
            rtol=rtol,
            msg=lambda m: f"step {n}, segments {layer.segment_lengths()}: {m}",
        )
        n += 1
    return n


# --- (a) the torch twin on CPU -----------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("value_sum", [True, False])
@pytest.mark.parametrize("split", [1, 3, 40])
def test_torch_twin_equals_reference(case, value_sum, split):
    """Prompt of 8 slots: the first steps have no middle (n_mid = 0, head still filling), later ones
    do; 40 splits leave most of them empty."""

    def fn(query, layer, mask, scaling):
        return pruned_decode_attention_torch(query, layer, mask, scaling=scaling, split=split)

    n = compare(CASES[case], fn, atol=1e-5, rtol=1e-5, prompt=8, steps=14, value_sum=value_sum, float_mask=split == 3)
    assert n == 14


def test_torch_twin_long_middle_and_no_padding():
    n = compare(
        CASES["gqa8x4-mixed"],
        lambda *a, **k: pruned_decode_attention_torch(*a, **k, split=4),
        atol=1e-5,
        rtol=1e-5,
        prompt=60,
        steps=3,
        pads=(0, 0, 0),
        sink=4,
        recent=8,
    )
    assert n == 3


def test_torch_twin_per_row_channels():
    """Channels chosen per (row, head) at prefill (a chooser's `kept` tensor)."""
    g = torch.Generator().manual_seed(3)
    chosen = torch.stack([torch.stack([torch.randperm(16, generator=g)[:6] for _ in range(2)]) for _ in PADS])
    fn = lambda *a, **k: pruned_decode_attention_torch(*a, **k, split=2)  # noqa: E731
    assert (
        compare(dict(hq=8, hkv=2, d=16, dv=16, kept=None, chosen=chosen), fn, atol=1e-5, rtol=1e-5, prompt=30, steps=3)
        == 3
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_twin_half_precision(dtype):
    fn = lambda *a, **k: pruned_decode_attention_torch(*a, **k, split=2)  # noqa: E731
    assert compare(CASES["gqa8x4-mixed"], fn, atol=1e-2, rtol=1e-2, prompt=30, steps=2, dtype=dtype) == 2


def test_public_function_uses_the_twin_on_cpu_and_decodes_one_token_only():
    query, layer, mask = next(decode_steps(**CASES["gqa4x2-partial"], prompt=30, steps=1))
    out = pruned_decode_attention(query, layer, mask, scaling=0.3)
    torch.testing.assert_close(out, pruned_decode_attention_torch(query, layer, mask, scaling=0.3), atol=0, rtol=0)
    with pytest.raises(ValueError, match="one token"):
        pruned_decode_attention(query.expand(-1, -1, 2, -1), layer, mask, scaling=0.3)


# --- (b) the Triton kernel under the Triton CPU interpreter --------------------------------------

INTERPRETER_CASES = [  # tiny: the interpreter runs every program in Python
    ("gqa4x2-full-none", dict(value_sum=True, split=3, dtype=torch.float32)),
    ("gqa4x2-partial", dict(value_sum=True, split=None, dtype=torch.float32, float_mask=True)),
    ("gqa8x4-mixed", dict(value_sum=False, split=3, dtype=torch.float32)),
    (
        "gqa8x4-mixed",
        dict(value_sum=True, split=2, dtype=torch.float32, recent=70, float_mask=True),
    ),  # 2 blocks of head+window
    ("gqa8x2-none-partial", dict(value_sum=False, split=1, dtype=torch.float32)),
    ("gqa4x2-full-none", dict(value_sum=True, split=20, dtype=torch.float32)),  # merge: slots in 2 chunks
    ("gqa8x4-mixed", dict(value_sum=True, split=2, dtype=torch.float16)),  # 16-bit tl.dot, p in two halves
    ("gqa4x2-partial", dict(value_sum=False, split=2, dtype=torch.bfloat16)),  # bf16 loads (fp32 dot here)
    ("gqa12x6-six-groups", dict(value_sum=False, split=2, dtype=torch.float32)),  # two launches of partials
]


def interpreter_main() -> int:
    """Triton path on CPU tensors vs the reference; exit 77 when the interpreter cannot run here."""
    why = unavailable()
    if why:
        print(f"SKIP: {why}")
        return 77
    from harness.kernels.pruned_decode import _pruned_decode_triton

    failures = 0
    for name, opts in INTERPRETER_CASES:
        split, dtype = opts["split"], opts["dtype"]
        tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
        fn = lambda *a, **k: _pruned_decode_triton(*a, **k, split=split)  # noqa: E731
        recent = opts.get("recent", 5)
        kw = dict(value_sum=opts["value_sum"], dtype=dtype, recent=recent, float_mask=opts.get("float_mask", False))
        try:  # prompt of 9 + recent slots: n_mid is 0, 0, 1, 2 over the four steps
            n = compare(CASES[name], fn, atol=tol, rtol=tol, prompt=9 + recent, steps=4, **kw)
            # a longer middle: several blocks of the kernel per split
            n += compare(CASES[name], fn, atol=tol, rtol=tol, prompt=150 + recent, steps=1, **kw)
            print(f"ok {name} {opts}: {n} steps")
        except Exception as exc:
            if "interpret" in repr(exc).lower() and "not supported" in repr(exc).lower():  # pragma: no cover
                print(f"SKIP: the interpreter cannot run the kernel: {exc!r}")
                return 77
            print(f"FAIL {name} {opts}: {exc}")
            failures += 1
    return 1 if failures else 0


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="a CUDA machine runs the kernels themselves (the CUDA tests below); the interpreter is for CPU-only CI",
)
def test_triton_kernel_under_the_cpu_interpreter():
    run_script(__file__, len(INTERPRETER_CASES))


# --- (c) the Triton kernel on CUDA at realistic shapes -------------------------------------------


def realistic_kept(hkv=8, d=128, seed=0, counts=(0, 16, 32, 48, 64, 96, 128, 0)):
    """Per-head kept counts (default from 0 to d): groups of one and of two heads."""
    g = torch.Generator().manual_seed(seed)
    counts = counts[:hkv]
    return tuple(tuple(sorted(torch.randperm(d, generator=g)[:c].tolist())) for c in counts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "dtype, value_sum, split, tol",
    [
        (torch.bfloat16, True, None, 2e-2),
        (torch.bfloat16, False, 7, 2e-2),
        (torch.float16, True, None, 5e-3),
        (torch.float32, True, 5, 1e-4),
    ],
)
def test_triton_kernel_on_cuda_equals_reference(dtype, value_sum, split, tol):
    torch.manual_seed(0)
    shape = dict(hq=32, hkv=8, d=128, dv=128, kept=realistic_kept())
    fn = lambda *a, **k: pruned_decode_attention(*a, **k, split=split)  # noqa: E731
    n = compare(
        shape,
        fn,
        atol=tol,
        rtol=tol,
        prompt=4096,
        steps=3,
        pads=(0, 37),
        sink=16,
        recent=64,
        value_sum=value_sum,
        dtype=dtype,
        device="cuda",
    )
    assert n == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_on_cuda_small_middle_and_odd_sizes():
    """n_mid from 0 upward, c and dv that are not powers of two, per-row channels."""
    g = torch.Generator().manual_seed(5)
    chosen = torch.stack([torch.stack([torch.randperm(48, generator=g)[:20] for _ in range(3)]) for _ in PADS])
    fn = lambda *a, **k: pruned_decode_attention(*a, **k)  # noqa: E731
    assert (
        compare(
            dict(hq=6, hkv=3, d=48, dv=40, kept=None, chosen=chosen),
            fn,
            atol=2e-2,
            rtol=2e-2,
            prompt=8,
            steps=20,
            dtype=torch.bfloat16,
            device="cuda",
        )
        == 20
    )
    assert compare(CASES["gqa8x4-mixed"], fn, atol=1e-4, rtol=1e-4, prompt=8, steps=20, device="cuda") == 20


if __name__ == "__main__":
    sys.exit(interpreter_main())
