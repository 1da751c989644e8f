"""The pruned K cache on a GPU: same equivalences as on CPU, with CUDA tensors (fp32 and bf16).
Skipped where there is no CUDA (CI)."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.families.hf_softmax import SoftmaxAdapter
from test_kcache import generate, mixed_selection, padded_batch, tiny_softmax

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_pruned_cache_equals_reference_on_cuda(kind, dtype, tol):
    model = tiny_softmax(kind).to("cuda", dtype)
    selection = mixed_selection(model)
    pruned, reference = copy.deepcopy(model), copy.deepcopy(model)
    SoftmaxAdapter().apply(pruned, selection)
    SoftmaxAdapter().zero(reference, selection)
    ids, mask = (t.cuda() for t in padded_batch())
    _, scores = generate(pruned, ids, mask)
    _, scores_ref = generate(reference, ids, mask)
    torch.testing.assert_close(scores.float(), scores_ref.float(), atol=tol, rtol=tol)


def test_decode_steps_on_cuda_take_the_triton_kernel(monkeypatch):
    from harness.families import hf_softmax

    calls = []
    kernel = hf_softmax.pruned_decode_attention
    monkeypatch.setattr(hf_softmax, "pruned_decode_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    model = tiny_softmax("llama").to("cuda", torch.bfloat16)
    SoftmaxAdapter().apply(model, mixed_selection(model))
    ids, mask = (t.cuda() for t in padded_batch())
    seq, _ = generate(model, ids, mask)
    steps = seq.shape[1] - ids.shape[1] - 1  # the first new token comes from the prefill
    assert len(calls) == steps * model.config.num_hidden_layers


def test_ratio_zero_on_cuda_matches_the_plain_model():
    model = tiny_softmax("llama").cuda()
    realized = copy.deepcopy(model)
    SoftmaxAdapter().apply(realized, SoftmaxAdapter().full_selection(realized))
    ids, mask = (t.cuda() for t in padded_batch())
    seq_plain, scores_plain = generate(model, ids, mask)
    seq, scores = generate(realized, ids, mask)
    assert torch.equal(seq, seq_plain)
    torch.testing.assert_close(scores, scores_plain, atol=1e-4, rtol=1e-4)


def test_leank_trains_on_cuda():
    from harness.compress import plan
    from harness.progress import bars

    p = plan("llama-tiny", "leank", [0.75], device="cuda", method_params={"steps": 10, "steps2": 4, "pool": 2})
    with bars(False) as bar:
        selection = p.select(p.capture(bar), 0.75, bar)
    assert selection.kept_ratio == 0.25
