"""The static pruned K cache (harness/static_kcache.py) and its decode kernels
(kernels/static_decode.py): bookkeeping on CPU, the torch twins against the dynamic cache's
reference attention, the Triton kernels against the twins under the Triton CPU interpreter (in a
subprocess, so TRITON_INTERPRET=1 reaches no other test) and on CUDA (skipped without a GPU).

Run as a script (`TRITON_INTERPRET=1 python tests/test_static_decode.py`) it checks the Triton
path on CPU tensors and exits 0 when every case agrees: that is what the interpreter test runs."""

from __future__ import annotations

import copy
import os
import sys

if __name__ == "__main__":  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from triton_interpreter import run_script, unavailable

from harness.kcache import KeyChannelPlan, PrunedKLayer
from harness.kernels import static_decode as sd
from harness.kernels.pruned_attention import pruned_cache_attention
from harness.static_kcache import StaticKCache, StaticKLayer, all_channels
from test_pruned_decode import realistic_kept

FULL, NONE = tuple(range(16)), ()
CASES = {  # per-KV-head kept channels (d = 16): all, none, partial counts, in several groupings
    "gqa4x2-full-none": dict(hq=4, hkv=2, dv=12, kept=(FULL, NONE)),
    "gqa4x2-partial": dict(hq=4, hkv=2, dv=12, kept=((1, 4, 9), (0, 2, 3, 5, 8, 13, 15))),
    "gqa8x4-mixed": dict(hq=8, hkv=4, dv=16, kept=(FULL, NONE, (0, 5, 7), (2, 3, 11))),
    # six kept counts: more groups than one launch of the Triton path takes (GROUPS_PER_LAUNCH)
    "gqa12x6-six-groups": dict(hq=12, hkv=6, dv=8, kept=((4,), (1, 2), NONE, (0, 3, 9), FULL, (5, 6, 7, 8, 10))),
}


class Stream:
    """Random prompts of different lengths (`lengths`) and decode tokens, fed to either cache."""

    def __init__(self, *, hq, hkv, dv, lengths, steps, d=16, dtype=torch.float32, device="cpu", seed=0):
        g = torch.Generator().manual_seed(seed)
        total = max(lengths) + steps
        self.k = torch.randn(len(lengths), hkv, total, d, generator=g).to(device, dtype)
        self.v = torch.randn(len(lengths), hkv, total, dv, generator=g).to(device, dtype)
        self.q = torch.randn(len(lengths), hq, total, d, generator=g).to(device, dtype)
        self.lengths, self.steps = lengths, steps

    def static(self, plan: KeyChannelPlan, capacity: int | None = None, chosen=None) -> StaticKLayer:
        """A StaticKLayer holding each row's prompt (its first lengths[row] tokens)."""
        b = len(self.lengths)
        layer = StaticKLayer(plan, b, capacity or max(self.lengths) + self.steps, self.k.dtype, self.k.device)
        if chosen is not None:
            layer.choose(list(range(b)), chosen)
        for row, n in enumerate(self.lengths):
            layer.commit([row], self.k[row : row + 1, :, :n], self.v[row : row + 1, :, :n])
        return layer

    def steps_of(self, layer, append=sd.static_append_torch):
        """Decode every row one token at a time: yields (query, lengths) after each append."""
        lengths = torch.tensor(self.lengths, dtype=torch.int32, device=self.k.device)
        for _ in range(self.steps):
            idx = lengths.long()[:, None, None, None]
            k = self.k.gather(2, idx.expand(-1, self.k.shape[1], 1, self.k.shape[3]))
            v = self.v.gather(2, idx.expand(-1, self.v.shape[1], 1, self.v.shape[3]))
            q = self.q.gather(2, idx.expand(-1, self.q.shape[1], 1, self.q.shape[3]))
            append(layer, k, v, lengths)
            yield q, lengths
            lengths = lengths + 1


def plan_of(case, *, sink=3, recent=5, value_sum=True, chosen=None):
    c = CASES[case]
    return KeyChannelPlan(
        c["hkv"],
        16,
        c["dv"],
        c["kept"] if chosen is None else None,
        sink=sink,
        recent=recent,
        value_sum=value_sum,
        count=0 if chosen is None else chosen.shape[-1],
    )


# --- bookkeeping ---------------------------------------------------------------------------------


def test_stores_hold_each_slot_where_the_layout_says():
    """After prompts of 2, 9 and 30 tokens and 12 steps (sink 3, recent 5: W = 6), every slot of
    every row sits in the head, the ring or the middle, with the kept channels in the middle."""
    case = CASES["gqa8x4-mixed"]
    stream = Stream(hq=case["hq"], hkv=case["hkv"], dv=case["dv"], lengths=[2, 9, 30], steps=12)
    layer = stream.static(plan_of("gqa8x4-mixed"))
    for _ in stream.steps_of(layer):
        pass
    sink, window = 3, 6
    for row, prompt in enumerate(stream.lengths):
        n = prompt + stream.steps  # tokens the row holds after its last append
        keys, values = stream.k[row, :, :n], stream.v[row, :, :n]
        torch.testing.assert_close(layer.head_k[row], keys[:, :sink], atol=0, rtol=0)
        for slot in range(max(sink, n - window), n):
            torch.testing.assert_close(layer.ring_k[row, :, (slot - sink) % window], keys[:, slot], atol=0, rtol=0)
            torch.testing.assert_close(layer.ring_v[row, :, (slot - sink) % window], values[:, slot], atol=0, rtol=0)
        middle = range(sink, n - window)
        for g in layer.groups:
            for j, head in enumerate(g.heads.tolist()):
                for i, slot in enumerate(middle):
                    torch.testing.assert_close(
                        g.keys[row, j, i], keys[head, slot, list(case["kept"][head])], atol=0, rtol=0
                    )
                    torch.testing.assert_close(g.values[row, j, i], values[head, slot], atol=0, rtol=0)
        sums = values[layer.sum_heads, sink : max(sink, n - window)].float().sum(1)
        torch.testing.assert_close(layer.value_sum[row], sums, atol=1e-5, rtol=1e-5)


def test_layout_sizes_and_bytes():
    plan = KeyChannelPlan(4, 16, 12, (FULL, NONE, (0, 5, 7), (2, 3, 11)), sink=3, recent=5)
    layer = StaticKLayer(plan, batch=2, capacity=100, dtype=torch.float16, device="cpu")
    assert layer.capacity == 100 - 3 - 6  # middle slots a row can hold
    assert [(g.count, g.heads.tolist()) for g in layer.groups] == [(16, [0]), (3, [2, 3])]
    assert layer.sum_heads.tolist() == [1] and layer.sum_index.tolist() == [-1, 0, -1, -1]
    # head + ring full (2 rows x 4 heads x 9 slots), middle: 16 + 3 + 3 channels of 91 slots, value sums fp32
    assert layer.nbytes() == {
        "keys": 2 * (4 * 9 * 16 + 91 * 22) * 2,
        "values": 2 * (4 * 9 * 12 + 3 * 91 * 12) * 2 + 2 * 12 * 4,
    }
    dense = StaticKLayer(all_channels(plan), batch=2, capacity=100, dtype=torch.float16, device="cpu")
    assert dense.dense and dense.nbytes() == {"keys": 2 * 4 * 100 * 16 * 2, "values": 2 * 4 * 100 * 12 * 2}


def test_a_prompt_longer_than_the_capacity_is_refused():
    stream = Stream(hq=4, hkv=2, dv=12, lengths=[40], steps=1)
    with pytest.raises(ValueError, match="does not fit"):
        stream.static(plan_of("gqa4x2-partial"), capacity=30)


def test_cache_lengths_reset_and_prefill_mode():
    plans = {0: plan_of("gqa4x2-partial"), 3: plan_of("gqa4x2-full-none")}
    cache = StaticKCache(plans, batch=2, capacity=64, dtype=torch.float32, device="cpu")
    assert set(cache.layers) == {0, 3}
    cache.set_lengths([1], 7)
    cache.advance()
    assert cache.lengths.tolist() == [1, 8]
    cache.layers[3].value_sum += 1
    cache.reset()
    assert cache.lengths.tolist() == [0, 0] and float(cache.layers[3].value_sum.abs().sum()) == 0
    k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 12)
    with cache.prefilling([1]):
        view, _ = cache.update(k, v, 3)
    assert view.rows == [1] and view.keys is k
    view, _ = cache.update(k[:, :, :1].expand(2, -1, -1, -1), v[:, :, :1].expand(2, -1, -1, -1), 0)
    assert view.lengths is cache.lengths  # a decode step appended at each row's length


# --- the twins against the dynamic cache's reference ----------------------------------------------


def dynamic_outputs(stream: Stream, plan: KeyChannelPlan, chosen=None) -> list[torch.Tensor]:
    """The same rows decoded through a PrunedKLayer (left-padded) and `pruned_cache_attention`."""
    width = max(stream.lengths)
    pads = torch.tensor([width - n for n in stream.lengths])
    b = len(stream.lengths)

    def padded(x, upto):  # each row's first `upto - pad` tokens, right-aligned in `upto` slots
        out = torch.zeros(b, x.shape[1], upto, x.shape[3], dtype=x.dtype)
        for row, pad in enumerate(pads.tolist()):
            out[row, :, pad:] = x[row, :, : upto - pad]
        return out

    layer = PrunedKLayer(plan)
    layer.update(padded(stream.k, width), padded(stream.v, width))
    layer.start(pads, chosen)
    layer.compact()
    outs = []
    for step in range(stream.steps):
        total = width + step + 1
        k, v, q = (padded(x, total)[:, :, -1:] for x in (stream.k, stream.v, stream.q))
        layer.update(k, v)
        mask = (torch.arange(total)[None, :] >= pads[:, None])[:, None, None, :]
        outs.append(pruned_cache_attention(q, layer, mask, scaling=0.3))
        layer.compact()
    return outs


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("value_sum", [True, False])
@pytest.mark.parametrize("sink", [0, 3])
def test_torch_twin_equals_the_dynamic_cache_reference(case, value_sum, sink):
    """Rows of 2, 9 and 30 tokens decoded 14 steps: the head fills, the ring wraps, the middle grows
    from 0; every step's attention equals the dynamic cache's (which pads rows on the left)."""
    c = CASES[case]
    stream = Stream(hq=c["hq"], hkv=c["hkv"], dv=c["dv"], lengths=[2, 9, 30], steps=14)
    plan = plan_of(case, sink=sink, value_sum=value_sum)
    expected = dynamic_outputs(stream, plan)
    layer = stream.static(plan)
    for (q, lengths), ref in zip(stream.steps_of(layer), expected):
        out = sd.static_decode_attention_torch(q, layer, lengths, scaling=0.3)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_torch_twin_per_row_channels():
    """Channels chosen per (row, head) at prefill (a chooser plan)."""
    g = torch.Generator().manual_seed(3)
    chosen = torch.stack([torch.stack([torch.randperm(16, generator=g)[:6] for _ in range(2)]) for _ in range(3)])
    stream = Stream(hq=8, hkv=2, dv=16, lengths=[4, 20, 33], steps=6)
    plan = KeyChannelPlan(2, 16, 16, None, sink=3, recent=5, count=6)
    expected = dynamic_outputs(stream, plan, chosen=chosen.sort(-1).values)
    layer = stream.static(plan, chosen=chosen)
    for (q, lengths), ref in zip(stream.steps_of(layer), expected):
        torch.testing.assert_close(
            sd.static_decode_attention_torch(q, layer, lengths, scaling=0.3), ref, atol=1e-5, rtol=1e-5
        )


def test_public_functions_use_the_twins_on_cpu_and_decode_one_token_only():
    stream = Stream(hq=4, hkv=2, dv=12, lengths=[12, 30], steps=1)
    layer = stream.static(plan_of("gqa4x2-partial"))
    twin = copy.deepcopy(layer)
    q, lengths = next(stream.steps_of(layer, append=sd.static_append))
    next(stream.steps_of(twin))
    torch.testing.assert_close(layer.ring_k, twin.ring_k, atol=0, rtol=0)
    out = sd.static_decode_attention(q, layer, lengths, scaling=0.3)
    torch.testing.assert_close(out, sd.static_decode_attention_torch(q, twin, lengths, scaling=0.3), atol=0, rtol=0)
    with pytest.raises(ValueError, match="one token"):
        sd.static_decode_attention(q.expand(-1, -1, 2, -1), layer, lengths, scaling=0.3)


# --- the Triton kernels against the twins ---------------------------------------------------------


def compare_triton(
    case,
    *,
    lengths,
    steps,
    sink=3,
    recent=5,
    value_sum=True,
    dtype=torch.float32,
    split=None,
    device="cpu",
    chosen=None,
    tol=1e-5,
    d=16,
) -> int:
    """Append + attention through Triton on one copy of a layer and through the twins on another:
    stores equal after every append, outputs within `tol`. Returns the steps compared."""
    c = case if isinstance(case, dict) else CASES[case]
    stream = Stream(hq=c["hq"], hkv=c["hkv"], dv=c["dv"], lengths=lengths, steps=steps, d=d, dtype=dtype, device=device)
    plan = KeyChannelPlan(
        c["hkv"],
        d,
        c["dv"],
        c["kept"] if chosen is None else None,
        sink=sink,
        recent=recent,
        value_sum=value_sum,
        count=0 if chosen is None else chosen.shape[-1],
    )
    twin = stream.static(plan, chosen=chosen)
    fast = copy.deepcopy(twin)
    n = 0
    for (q, lengths_now), _ in zip(stream.steps_of(fast, append=sd._append_triton), stream.steps_of(twin)):
        for name in ("head_k", "head_v", "ring_k", "ring_v", "keys_flat", "values_flat"):
            assert torch.equal(getattr(fast, name), getattr(twin, name)), f"step {n}: {name}"
        if twin.value_sum is not None:
            torch.testing.assert_close(fast.value_sum, twin.value_sum, atol=1e-4, rtol=1e-5)
        ref = sd.static_decode_attention_torch(q, twin, lengths_now, scaling=0.3)
        out = sd._attention_triton(q, fast, lengths_now, scaling=0.3, split=split)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol, msg=lambda m: f"step {n}: {m}")
        n += 1
    return n


INTERPRETER_CASES = [  # tiny: the interpreter runs every program in Python
    ("gqa4x2-full-none", dict()),
    ("gqa4x2-partial", dict(split=3)),
    ("gqa8x4-mixed", dict(value_sum=False, split=2)),
    ("gqa12x6-six-groups", dict()),  # two launches of partials
    ("gqa8x4-mixed", dict(sink=0, split=40)),  # no sink: blocks before any real slot; most splits empty
    ("gqa8x4-mixed", dict(dtype=torch.float16, tol=3e-3)),  # 16-bit tl.dot, p in two halves
]


def interpreter_main() -> int:
    """Triton path on CPU tensors vs the twins; exit 77 when the interpreter cannot run here."""
    why = unavailable()
    if why:
        print(f"SKIP: {why}")
        return 77
    failures = 0
    for name, opts in INTERPRETER_CASES:
        try:  # rows of 2, 9 and 30 tokens and 12 steps: head filling, ring wrapping, middle from 0
            n = compare_triton(name, lengths=[2, 9, 30], steps=12, **opts)
            print(f"ok {name} {opts}: {n} steps")
        except Exception as exc:
            if "interpret" in repr(exc).lower() and "not supported" in repr(exc).lower():  # pragma: no cover
                print(f"SKIP: the interpreter cannot run the kernel: {exc!r}")
                return 77
            print(f"FAIL {name} {opts}: {exc}")
            failures += 1
    g = torch.Generator().manual_seed(3)
    chosen = torch.stack([torch.stack([torch.randperm(16, generator=g)[:6] for _ in range(2)]) for _ in range(3)])
    try:
        n = compare_triton(dict(hq=8, hkv=2, dv=16, kept=None), lengths=[4, 20, 33], steps=5, chosen=chosen)
        print(f"ok per-row channels: {n} steps")
    except Exception as exc:
        print(f"FAIL per-row channels: {exc}")
        failures += 1
    return 1 if failures else 0


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="a CUDA machine runs the kernels themselves (the CUDA tests below); the interpreter is for CPU-only CI",
)
def test_triton_kernels_under_the_cpu_interpreter():
    run_script(__file__, len(INTERPRETER_CASES) + 1)


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
def test_triton_kernels_on_cuda_equal_the_twins(dtype, value_sum, split, tol):
    """Llama-3.1-8B head geometry, rows of different lengths around 2k."""
    torch.manual_seed(0)
    case = dict(hq=32, hkv=8, dv=128, kept=realistic_kept(counts=(0, 32, 64, 96, 128, 0, 32, 64)))  # as LeanK masks
    assert (
        compare_triton(
            case,
            lengths=[2048, 1500, 17],
            steps=3,
            sink=16,
            recent=64,
            value_sum=value_sum,
            dtype=dtype,
            split=split,
            device="cuda",
            tol=tol,
            d=128,
        )
        == 3
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernels_on_cuda_small_rows_and_odd_sizes():
    for name, opts in INTERPRETER_CASES:
        assert compare_triton(name, lengths=[2, 9, 30], steps=12, device="cuda", **opts) == 12


if __name__ == "__main__":
    sys.exit(interpreter_main())
