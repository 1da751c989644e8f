"""KDA on a CUDA GPU: fla's Triton ``chunk_kda`` / ``fused_recurrent_kda`` against the CPU
references (harness.kernels.kda, run on the same CUDA tensors and in float64 as a yardstick), and
the KDA adapter's slicing under fla's own kernels.

The kernels are called with exactly the arguments fla's ``KimiDeltaAttention`` passes (L2 norm,
gate and beta sigmoid in the kernel, ``state_v_first``), dense and packed (``cu_seqlens``), in
bf16 and fp32, for a full key head dim of 128 and pruned ones of 64 and 32, with the softplus gate
and with ``lower_bound`` (``safe_gate`` selects fla's faster bounded-gate kernel). Errors are
printed and, when ``HARNESS_PARITY_OUT`` names a file, appended to it as JSON lines (the fields of
tests/test_kernels_gpu.py). Tolerances are that file's; these tests have not been run yet
(written on a CPU-only machine): the first GPU run sets what they really are.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from harness.kernels import fla_cpu, kda
from test_kernels_gpu import DTYPES, GRAD_FACTOR, TOL, compare, record

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; fla's Triton kernels cannot run on CPU"),
]

B, T, H, V = 2, 1024, 4, 128
VARLEN = [0, 257, 1000, 2048]
GATES = {"softplus": dict(), "safe_gate": dict(lower_bound=-5.0, safe_gate=True)}


@pytest.fixture(scope="module", autouse=True)
def _installed():
    fla_cpu.install()


def fla_original(name: str):
    import fla.ops.kda

    fn = getattr(fla.ops.kda, name)
    return getattr(fn, "_harness_original", fn)


def make_inputs(K, dtype, varlen, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    b, t = (1, VARLEN[-1]) if varlen else (B, T)
    n = len(VARLEN) - 1 if varlen else B

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    x = dict(
        q=F.silu(randn(b, t, H, K)),
        k=F.silu(randn(b, t, H, K)),
        v=F.silu(randn(b, t, H, V)),
        g=randn(b, t, H, K),
        beta=randn(b, t, H),  # raw f_proj and b_proj outputs
        initial_state=0.1 * randn(n, H, V, K),  # state_v_first
        A_log=torch.empty(H, device="cuda").uniform_(1, 16, generator=gen).log(),
        dt_bias=0.1 * randn(H * K),
    )
    for key in ("q", "k", "v", "g", "beta"):
        x[key] = x[key].to(dtype)
    cu = torch.tensor(VARLEN, device="cuda", dtype=torch.long) if varlen else None
    return x, cu


def layer_kwargs(gate: str, chunk: bool) -> dict:
    kwargs = dict(
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
        use_gate_in_kernel=True,
        use_beta_sigmoid_in_kernel=True,
        allow_neg_eigval=False,
        state_v_first=True,
        lower_bound=GATES[gate].get("lower_bound"),
    )
    if chunk:
        kwargs["safe_gate"] = GATES[gate].get("safe_gate", False)
    return kwargs


CASES = [("chunk_kda", kda.chunk_kda, True), ("fused_recurrent_kda", kda.fused_recurrent_kda, False)]
PARAMS = [
    pytest.param(name, ref, chunk, dt, K, gate, varlen, id=f"{name}-{dt}-K{K}-{gate}-{'varlen' if varlen else 'dense'}")
    for name, ref, chunk in CASES
    for dt in ("bf16", "fp32")
    for K in (128, 64, 32)
    for gate in GATES
    for varlen in (False, True)
]


@pytest.mark.parametrize("name, reference, chunk, dtype, K, gate, varlen", PARAMS)
def test_kda_kernel_parity(name, reference, chunk, dtype, K, gate, varlen):
    x, cu = make_inputs(K, DTYPES[dtype], varlen)
    kwargs = dict(layer_kwargs(gate, chunk), cu_seqlens=cu)
    with torch.no_grad():
        o, s = fla_original(name)(**x, **kwargs)
        o_ref, s_ref = reference(**x, **kwargs)
        o_x, s_x = reference(**{k: v.double() for k, v in x.items()}, **kwargs)
    meta = dict(kernel=name, dtype=dtype, K=K, gate=gate, varlen=varlen)
    compare("kda_kernel", "o", o, o_ref, o_x, TOL[dtype], **meta)
    compare("kda_kernel", "final_state", s, s_ref, s_x, TOL[dtype], **meta)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("gate", list(GATES))
def test_kda_chunk_grad_parity(dtype, gate):
    x, _ = make_inputs(64, DTYPES[dtype], False, seed=1)
    names = ("q", "k", "v", "g", "beta", "A_log", "dt_bias")
    grads = []
    for fn in (fla_original("chunk_kda"), kda.chunk_kda):
        leaves = {k: v.detach().clone().requires_grad_(k in names) for k, v in x.items()}
        o, s = fn(**leaves, **layer_kwargs(gate, True))
        (o.float().pow(2).sum() + s.sum()).backward()
        grads.append({k: leaves[k].grad.float() for k in names})
    for k in names:
        exact = grads[1][k].double()  # the reference's own gradient stands in for float64 here
        compare("kda_grad", f"d{k}", grads[0][k], grads[1][k], exact, TOL[dtype] * GRAD_FACTOR, dtype=dtype, gate=gate)


def _model(**over):
    from fla.models import KDAConfig
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = KDAConfig(
        hidden_size=512, num_hidden_layers=2, num_heads=4, head_dim=128, expand_v=1.0, vocab_size=1000, **over
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("gate", list(GATES))
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kda_model_cpu_reference_vs_cuda_triton(gate, dtype):
    model = _model(**GATES[gate])
    ids = torch.randint(0, 1000, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = model.float()(input_ids=ids, use_cache=True)
        exact = model.double()(input_ids=ids, use_cache=True)
        gpu = model.to("cuda", DTYPES[dtype])(input_ids=ids.cuda(), use_cache=True)
    meta = dict(family="kda", dtype=dtype, gate=gate, T=300)
    compare("kda_model", "logits", gpu.logits.float().cpu(), cpu.logits, exact.logits, TOL[dtype] * 2.5, **meta)
    for i in range(2):
        s_gpu = gpu.past_key_values[i]["recurrent_state"].float().cpu()
        s_cpu, s_x = cpu.past_key_values[i]["recurrent_state"], exact.past_key_values[i]["recurrent_state"]
        assert s_gpu.shape == s_cpu.shape
        compare("kda_model", f"layer{i}.recurrent_state", s_gpu, s_cpu, s_x, TOL[dtype] * 2.5, **meta)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_kda_slicing_equals_zeroing_under_fla_kernels(ratio, monkeypatch):
    """On the GPU (fla's Triton kernels, fp32), at one forced kernel scale, a sliced KDA model equals
    its zero-masked twin, and its pruned checkpoint decodes with fla's kernels."""
    import fla.layers.kda

    from harness.families import adapter_for
    from harness.methods.random import RandomChannels

    model = _model().cuda()
    adapter = adapter_for(model)
    selection = RandomChannels(seed=0).select(adapter.capture(model, [], RandomChannels.needs), ratio, "kda")
    zeroed, sliced = copy.deepcopy(model), copy.deepcopy(model)
    adapter.zero(zeroed, selection)
    adapter.apply(sliced, selection)
    keep = 128 - int(128 * ratio)
    for name in ("chunk_kda", "fused_recurrent_kda"):
        monkeypatch.setattr(fla.layers.kda, name, functools.partial(getattr(fla.layers.kda, name), scale=keep**-0.5))
    ids = torch.randint(0, 1000, (2, 300), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        ref, got = zeroed(input_ids=ids).logits, sliced(input_ids=ids).logits
    e = (got - ref).abs().max().item() / ref.abs().max().item()
    record(test="kda_slice_vs_zero", ratio=ratio, max_rel=e)
    assert e < TOL["fp32"] * 2.5
    out = sliced.generate(ids[:1, :20], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape == (1, 28)
